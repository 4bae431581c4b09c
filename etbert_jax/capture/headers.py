"""Header policies: which bytes of a decoded packet become tokens, and which fields are blanked.

`apply_header_policy(policy, data, packet, seq_base)` returns a new `bytes` object:

- `anonymize` (default): the IP packet from the IP header to the IP end, with the fields that identify
  hosts or leak capture context zeroed. IPv4: identification, TTL, header checksum, source and
  destination address. IPv6: flow label, hop limit, source and destination address. TCP: ports,
  checksum and the TSval/TSecr values of every timestamp option (kind 8). The TCP sequence number
  becomes relative to the sending direction's initial sequence number, and the acknowledgement number
  relative to the other direction's. Both are taken modulo 2^32 and are 0 while the base is unknown.
  UDP: ports and checksum. Everything else stays as captured, IPv4 options, IPv6 extension headers and
  the payload included.
- `strip-link`: the IP packet from the IP header to the IP end, unchanged.
- `raw`: the frame from the link-layer header to the IP end, so Ethernet padding and FCS are dropped.
- `etbert`: the captured frame exactly as stored, padding included, as ET-BERT reads it. ET-BERT then
  keeps the first 64 bytes of each packet for BURSTs (`ETBERT_BURST_BYTES`) and drops the first 38
  bytes for fine-tuning (`etbert_finetune_bytes`).

The IP end is the IP total length bounded by the captured bytes, so no policy reads past the capture.
"""

from __future__ import annotations

import struct

from etbert_jax.capture.decode import ACK, TCP, Packet
from etbert_jax.capture.options import check_header_policy

# Bytes of each raw frame that ET-BERT keeps for a BURST in its pre-training corpus.
ETBERT_BURST_BYTES = 64
# Bytes ET-BERT drops from each frame for fine-tuning: Ethernet (14) + IPv4 without options (20) + ports (4).
ETBERT_FINETUNE_OFFSET = 38

_TCP_OPTION_END = 0
_TCP_OPTION_NOP = 1
_TCP_OPTION_TIMESTAMP = 8
_U32 = struct.Struct("!I")
_ZEROS_4 = bytes(4)
_ZEROS_8 = bytes(8)
_ZEROS_32 = bytes(32)


def apply_header_policy(
    policy: str,
    data: bytes,
    packet: Packet,
    seq_base: tuple[int | None, int | None] = (None, None),
) -> bytes:
    """Return the bytes of `packet` that `policy` keeps, with the fields that the policy blanks zeroed.

    `seq_base` is (initial sequence number of the sender, initial sequence number of the receiver),
    used only by `anonymize` on TCP packets.
    """
    if policy == "anonymize":
        return anonymize(data, packet, seq_base)
    if policy == "strip-link":
        return bytes(data[packet.ip_offset : packet.end])
    if policy == "raw":
        return bytes(data[: packet.end])
    if policy == "etbert":
        return bytes(data)
    check_header_policy(policy)
    raise AssertionError(f"header policy {policy!r} is listed but not implemented")


def etbert_finetune_bytes(frame: bytes) -> bytes:
    """Return ET-BERT's fine-tuning bytes of a captured frame: everything after its first 38 bytes."""
    return frame[ETBERT_FINETUNE_OFFSET:]


def etbert_burst_bytes(frame: bytes) -> bytes:
    """Return ET-BERT's pre-training bytes of a captured frame: its first 64 bytes."""
    return frame[:ETBERT_BURST_BYTES]


def relative_sequence(value: int, base: int | None) -> int:
    """Return `value - base` modulo 2^32, or 0 when the base is unknown."""
    if base is None:
        return 0
    return (value - base) & 0xFFFFFFFF


def anonymize(data: bytes, packet: Packet, seq_base: tuple[int | None, int | None]) -> bytes:
    """Return the IP packet with addresses, ports, IDs, TTLs, checksums and TCP timestamps blanked."""
    ip = packet.ip_offset
    out = bytearray(data[ip : packet.end])

    if packet.ip_version == 4:
        out[4:6] = b"\0\0"  # identification
        out[8] = 0  # TTL
        out[10:12] = b"\0\0"  # header checksum
        out[12:20] = _ZEROS_8  # source and destination address
    else:
        out[1] &= 0xF0  # low nibble of byte 1 starts the flow label
        out[2:4] = b"\0\0"
        out[7] = 0  # hop limit
        out[8:40] = _ZEROS_32  # source and destination address

    l4 = packet.l4_offset - ip
    out[l4 : l4 + 4] = _ZEROS_4  # source and destination port
    if packet.proto == TCP:
        sender_base, receiver_base = seq_base
        out[l4 + 4 : l4 + 8] = _U32.pack(relative_sequence(packet.seq, sender_base))
        ack = relative_sequence(packet.ack, receiver_base) if packet.tcp_flags & ACK else 0
        out[l4 + 8 : l4 + 12] = _U32.pack(ack)
        out[l4 + 16 : l4 + 18] = b"\0\0"  # checksum
        _zero_tcp_timestamps(out, l4 + 20, packet.payload_offset - ip)
    else:
        out[l4 + 6 : l4 + 8] = b"\0\0"  # checksum
    return bytes(out)


def _zero_tcp_timestamps(out: bytearray, start: int, stop: int) -> None:
    """Zero TSval and TSecr of every timestamp option between start and stop (the TCP options)."""
    pos = start
    while pos < stop:
        kind = out[pos]
        if kind == _TCP_OPTION_END:
            return
        if kind == _TCP_OPTION_NOP:
            pos += 1
            continue
        if pos + 1 >= stop:
            return
        length = out[pos + 1]
        if length < 2 or pos + length > stop:
            # A malformed option list: the rest cannot be parsed safely, so it stays as captured.
            return
        if kind == _TCP_OPTION_TIMESTAMP and length == 10:
            out[pos + 2 : pos + 10] = _ZEROS_8
        pos += length
