"""The agent: the application layer that runs a capture, live or from files, into the store.

source -> analyzer (tracer.pipeline) -> store worker (tracer.agent.store_worker) with
attribution (tracer.agent.attribution) and retention (store.retention); the processes
talk in typed messages (tracer.agent.messages), and deadlines drive them, never packet
counts (tracer.agent.live, tracer.agent.files). The command line (cli/) only parses,
calls and prints.
"""
