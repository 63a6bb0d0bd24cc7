"""Pure joins between the kernel's socket table and the connections on the wire."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from tracer.attribution.sockets import LISTEN, SocketEntry

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class OpenConnection:
    """A connection the socket table shows, oriented client -> server."""

    client: Endpoint
    server: Endpoint
    state: int
    client_inode: int | None  # the client's socket, when it is on this host
    server_inode: int | None

    def key(self) -> bytes:
        """The flow key the decoder builds for the client's packets."""
        return flow_key(self.client, self.server)


def flow_key(src: Endpoint, dst: Endpoint) -> bytes:
    family = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    return (socket.inet_pton(family, src[0]) + socket.inet_pton(family, dst[0])
            + struct.pack(">HH", src[1], dst[1]))


def open_connections(entries: list[SocketEntry], ports: frozenset[int]) -> list[OpenConnection]:
    """The connections to or from ``ports`` the tables show, each once, oriented by the
    server port. Both ends appear when client and server share a host."""
    found: dict[tuple[Endpoint, Endpoint], dict[str, int | None]] = {}
    for e in entries:
        if e.state == LISTEN:
            continue
        if e.remote[1] in ports:
            pair, side = (e.local, e.remote), "client"
        elif e.local[1] in ports:
            pair, side = (e.remote, e.local), "server"
        else:
            continue
        slot = found.setdefault(pair, {"client": None, "server": None, "state": e.state})
        slot[side] = e.inode
        if e.state != slot["state"] and side == "client":
            slot["state"] = e.state  # the client's view of its own connection wins
    return [
        OpenConnection(client, server, int(v["state"] or 0), v["client"], v["server"])
        for (client, server), v in found.items()
    ]


def client_sockets(entries: list[SocketEntry]) -> dict[tuple[Endpoint, Endpoint], SocketEntry]:
    """Sockets by (local, remote): look a connection's client end up as
    ``(orig, resp)``."""
    return {(e.local, e.remote): e for e in entries if e.state != LISTEN}
