"""TCP endpoint states, Zeek's history letters and the conn_state verdict derived from them."""

from __future__ import annotations

# Endpoint states (Zeek's TCP_* endpoint states).
INACTIVE = 0
SYN_SENT = 1
SYN_ACK_SENT = 2
PARTIAL = 3
ESTABLISHED = 4
CLOSED = 5
RESET = 6

STATE_NAMES = ("INACTIVE", "SYN_SENT", "SYN_ACK_SENT", "PARTIAL", "ESTABLISHED", "CLOSED", "RESET")

# History letters, originator case; the responder's are the lower-case ones.
# Recorded once per direction: A D I Q.  Recorded again when the sequence number differs
# from the last one of the same kind: S H F R.  Recorded at 1, 10, 100, ... : G T W.
H_SYN = "S"
H_SYNACK = "H"
H_ACK = "A"
H_DATA = "D"
H_FIN = "F"
H_RST = "R"
H_GAP = "G"
H_RETRANSMIT = "T"
H_ZERO_WINDOW = "W"
H_INCONSISTENT = "I"
H_MULTIFLAG = "Q"

LOG_MARKS = frozenset(10**i for i in range(12))

CONN_STATES = {
    "S0": "connection attempt seen, no reply",
    "S1": "connection established, not terminated",
    "SF": "normal establishment and termination",
    "REJ": "connection attempt rejected",
    "S2": "established, close attempt by originator seen (no reply from responder)",
    "S3": "established, close attempt by responder seen (no reply from originator)",
    "RSTO": "established, originator aborted (sent a RST)",
    "RSTR": "responder sent a RST",
    "RSTOS0": "originator sent a SYN followed by a RST, no SYN-ACK seen",
    "RSTRH": "responder sent a SYN-ACK followed by a RST, no SYN seen",
    "SH": "originator sent a SYN followed by a FIN, no SYN-ACK seen",
    "SHR": "responder sent a SYN-ACK followed by a FIN, no SYN seen",
    "OTH": "no SYN seen, just midstream traffic",
}


def _rst_after_bare_syn(history: str) -> bool:
    """History matches Zeek's ``^?S[^HAFGIQ]*R.*``: a SYN, then a RST, nothing in between."""
    h = history.removeprefix("^")
    if not h.startswith("S"):
        return False
    for ch in h[1:]:
        if ch == "R":
            return True
        if ch in "HAFGIQ":
            return False
    return False


def conn_state(orig: int, resp: int, orig_size: int, resp_size: int, history: str) -> str:
    """Zeek's conn_state for one TCP connection from its two endpoint states."""
    o_inactive = orig in (INACTIVE, PARTIAL)
    r_inactive = resp in (INACTIVE, PARTIAL)
    if resp == RESET:
        if orig in (SYN_SENT, SYN_ACK_SENT) or (
            orig == RESET and orig_size == 0 and resp_size == 0
        ):
            return "REJ"
        return "RSTRH" if o_inactive else "RSTR"
    if orig == RESET:
        if r_inactive:
            return "RSTOS0" if _rst_after_bare_syn(history) else "OTH"
        return "RSTO"
    if resp == CLOSED and orig == CLOSED:
        return "SF"
    if orig == CLOSED:
        return "SH" if r_inactive else "S2"
    if resp == CLOSED:
        return "SHR" if o_inactive else "S3"
    if orig == SYN_SENT and resp == INACTIVE:
        return "S0"
    if orig == ESTABLISHED and resp == ESTABLISHED:
        return "S1"
    return "OTH"
