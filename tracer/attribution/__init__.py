"""Which process owns a connection: /proc socket tables and process details (the adapter) and
the pure join of sockets to connections."""
