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

`policy_rows` applies a policy to many packets of a `PacketBatch` at once with a compiled kernel;
`apply_header_policy` runs the same kernel on one packet.
"""

from __future__ import annotations

import numba
import numpy as np

from etbert_jax.capture import decode
from etbert_jax.capture.decode import ACK, TCP, Packet, PacketBatch
from etbert_jax.capture.options import HEADER_POLICIES, check_header_policy

# Bytes of each raw frame that ET-BERT keeps for a BURST in its pre-training corpus.
ETBERT_BURST_BYTES = 64
# Bytes ET-BERT drops from each frame for fine-tuning: Ethernet (14) + IPv4 without options (20) + ports (4).
ETBERT_FINETUNE_OFFSET = 38

# Policy codes of the kernel, in the order of HEADER_POLICIES.
_ANONYMIZE, _STRIP_LINK, _RAW, _ETBERT = (HEADER_POLICIES.index(name)
                                          for name in ("anonymize", "strip-link", "raw", "etbert"))
_TCP_OPTION_END = 0
_TCP_OPTION_NOP = 1
_TCP_OPTION_TIMESTAMP = 8
# Sequence base of a direction whose initial sequence number is not known yet.
UNKNOWN_BASE = -1


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
    check_header_policy(policy)
    row = np.zeros((1, decode.NUM_FIELDS), dtype=np.int64)
    for column, value in ((decode.IP_OFFSET, packet.ip_offset), (decode.IP_VERSION, packet.ip_version),
                          (decode.PROTO, packet.proto), (decode.L4_OFFSET, packet.l4_offset),
                          (decode.PAYLOAD_OFFSET, packet.payload_offset), (decode.END, packet.end),
                          (decode.TCP_FLAGS, packet.tcp_flags), (decode.SEQ, packet.seq),
                          (decode.ACK_NUMBER, packet.ack)):
        row[0, column] = value
    buf = np.frombuffer(data, dtype=np.uint8)
    start, caplen = np.zeros(1, dtype=np.int64), np.array([len(data)], dtype=np.int64)
    bases = [UNKNOWN_BASE if base is None else base for base in seq_base]
    width = int(kept_lengths(policy, row, caplen)[0])
    out = np.zeros((1, width), dtype=np.uint8)
    lengths = np.zeros(1, dtype=np.int64)
    _apply_rows(buf, start, caplen, row, np.zeros(1, dtype=np.int64), np.array(bases[:1], dtype=np.int64),
                np.array(bases[1:], dtype=np.int64), HEADER_POLICIES.index(policy), out, lengths)
    return out[0, : lengths[0]].tobytes()


def kept_lengths(policy: str, fields: np.ndarray, caplen: np.ndarray) -> np.ndarray:
    """Return how many bytes `policy` keeps of each decoded packet, before any cut."""
    if policy in ("anonymize", "strip-link"):
        return fields[:, decode.END] - fields[:, decode.IP_OFFSET]
    if policy == "raw":
        return fields[:, decode.END].copy()
    return np.asarray(caplen, dtype=np.int64).copy()


def policy_rows(policy: str, batch: PacketBatch, rows: np.ndarray, sender_base: np.ndarray,
                receiver_base: np.ndarray, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Apply `policy` to the selected rows of a batch; return (bytes (m, width) uint8, lengths).

    Row j of the result contains the first `lengths[j]` policy-applied bytes of packet `rows[j]`, cut to
    `width` (None: no cut). The sequence bases are per selected row, `UNKNOWN_BASE` where unknown.
    """
    records = batch.records
    if width is None:
        full = kept_lengths(policy, batch.fields[rows], records.caplen[rows])
        width = int(full.max()) if len(full) else 0
    out = np.zeros((len(rows), width), dtype=np.uint8)
    lengths = np.zeros(len(rows), dtype=np.int64)
    _apply_rows(records.buf, records.start, records.caplen, batch.fields, rows, sender_base, receiver_base,
                HEADER_POLICIES.index(policy), out, lengths)
    return out, lengths


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


# ---- the compiled kernel ------------------------------------------------------------------------

@numba.njit(cache=True, inline="always")
def _zero(out, pos):
    if pos < out.shape[0]:
        out[pos] = 0


@numba.njit(cache=True, inline="always")
def _put_u32(out, pos, value):
    for k in range(4):
        if pos + k < out.shape[0]:
            out[pos + k] = (value >> (24 - 8 * k)) & 0xFF


@numba.njit(cache=True)
def _relative(value, base):
    if base < 0:
        return 0
    return (value - base) & 0xFFFFFFFF


@numba.njit(cache=True)
def _apply_rows(buf, starts, caplens, fields, rows, sender_base, receiver_base, policy, out, lengths):
    """Write the policy-applied bytes of packets `rows` into the rows of `out`, cut to its width."""
    width = out.shape[1]
    for j in range(rows.shape[0]):
        row = rows[j]
        base = starts[row]
        ip = fields[row, 1]
        end = fields[row, 8]
        if policy == _ANONYMIZE or policy == _STRIP_LINK:
            first, stop = ip, end
        elif policy == _RAW:
            first, stop = 0, end
        else:
            first, stop = 0, caplens[row]
        count = min(stop - first, width)
        lengths[j] = count
        line = out[j, :count]
        for k in range(count):
            line[k] = buf[base + first + k]
        if policy == _ANONYMIZE:
            _anonymize(buf, base, fields[row], sender_base[j], receiver_base[j], line)


@numba.njit(cache=True)
def _anonymize(buf, base, row, sender_base, receiver_base, out):
    """Blank addresses, ports, IDs, TTLs, checksums and TCP timestamps of one IP packet in `out`."""
    ip = row[1]
    if row[2] == 4:
        for pos in (4, 5, 8, 10, 11):  # identification, TTL, header checksum
            _zero(out, pos)
        for pos in range(12, 20):  # source and destination address
            _zero(out, pos)
    else:
        if out.shape[0] > 1:
            out[1] &= 0xF0  # low nibble of byte 1 starts the flow label
        for pos in (2, 3, 7):  # rest of the flow label, hop limit
            _zero(out, pos)
        for pos in range(8, 40):  # source and destination address
            _zero(out, pos)

    l4 = row[6] - ip
    for pos in range(l4, l4 + 4):  # source and destination port
        _zero(out, pos)
    if row[3] == TCP:
        _put_u32(out, l4 + 4, _relative(row[10], sender_base))
        ack = _relative(row[11], receiver_base) if row[9] & ACK else 0
        _put_u32(out, l4 + 8, ack)
        _zero(out, l4 + 16)  # checksum
        _zero(out, l4 + 17)
        # TSval and TSecr of every timestamp option between the fixed header and the payload.
        pos = l4 + 20
        stop = row[7] - ip
        while pos < stop:
            kind = buf[base + ip + pos]
            if kind == _TCP_OPTION_END:
                break
            if kind == _TCP_OPTION_NOP:
                pos += 1
                continue
            if pos + 1 >= stop:
                break
            length = np.int64(buf[base + ip + pos + 1])
            if length < 2 or pos + length > stop:
                # A malformed option list: the rest cannot be parsed safely, so it stays as captured.
                break
            if kind == _TCP_OPTION_TIMESTAMP and length == 10:
                for k in range(pos + 2, pos + 10):
                    _zero(out, k)
            pos += length
    else:
        _zero(out, l4 + 6)  # checksum
        _zero(out, l4 + 7)
