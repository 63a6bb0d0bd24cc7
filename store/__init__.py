"""The SQLite store: schema and migrations, the batched writer, the read-side queries."""
