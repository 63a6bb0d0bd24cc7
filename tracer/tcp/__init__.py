"""TCP connection tracking: endpoint states, history letters, the bounded flow table."""
