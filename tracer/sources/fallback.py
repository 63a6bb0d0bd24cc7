"""scapy at the I/O edge: find the IP header in frames of link types the fast decoder lacks.

Used only for link types ``tracer.decode`` does not know (radiotap, PPP, ...): scapy
dissects the link layer once per frame, and the IP packet it finds goes through the same
fast decoder as everything else. Slow, and therefore never on the common path.
"""

from __future__ import annotations

from tracer.decode import SKIP_NOT_IP, Decoder, DecodeResult, Malformed, make_ip_decoder


def scapy_decoder(
    linktype: int, ports: frozenset[int], shard: tuple[int, int] = (0, 1)
) -> Decoder | None:
    """A decoder for ``linktype`` through scapy's dissectors, or None if scapy lacks one."""
    import scapy.layers.all  # noqa: F401  (registers the link-type dissectors)
    from scapy.config import conf
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    layer_class = conf.l2types.num2layer.get(linktype)
    if layer_class is None:
        return None
    ip_decoder = make_ip_decoder(ports, shard)
    name = layer_class.__name__

    def decode(frame: bytes) -> DecodeResult:
        try:
            pkt = layer_class(frame)
        except Exception as exc:  # noqa: BLE001 - scapy raises anything on hostile input
            raise Malformed("undecodable_link_layer", f"{name}: {exc}") from None
        ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        if ip is None:
            return SKIP_NOT_IP
        return ip_decoder(bytes(ip))

    return decode
