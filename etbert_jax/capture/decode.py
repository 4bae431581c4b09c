"""Decode link-layer, IP and TCP/UDP headers of captured frames into offsets and fields.

One compiled function, `_decode_frame` (numba), decodes every frame: `decode_batch` runs it over a
`RecordBatch` and fills one row of int64 fields per frame (the column constants `IP_OFFSET`,
`PROTO`, ... name them), and `decode_packet(linktype, data, wire_len)` runs it on one frame and
returns a `Packet` or a skip reason string. Headers are read straight from the captured bytes;
nothing is copied.

Link types:
- Ethernet (1) with any stack of 802.1Q/802.1ad tags (0x8100, 0x88a8, 0x9100, 0x9200), with MPLS
  (0x8847, 0x8848), where the version nibble after the bottom label picks IPv4 or IPv6, and with PPPoE
  sessions (0x8864, PPP 0x0021 or 0x0057);
- Linux cooked captures SLL (113) and SLL2 (276);
- raw IP (12, 14 and 101 by version nibble, 228 IPv4, 229 IPv6);
- BSD NULL (0, host byte order, detected) and LOOP (108, network byte order);
- NFLOG (239), whose payload TLV contains the IP packet.
Any other link type is skipped as `unsupported_linktype:<n>`.

NOTE: tunnels are not decapsulated. VXLAN, Teredo and GTP-U packets count as their outer UDP flow, and
GRE or IP-in-IP packets are skipped as `not_tcp_udp`.

Skip reasons (see docs/capture-rules.md for the full rules):
`truncated_link_header`, `non_ip`, `unsupported_linktype:<n>`, `truncated_ip_header`, `bad_ip_header`,
`bad_ip_length`, `ip_fragment`, `not_tcp_udp`, `truncated_tcp_header`, `bad_tcp_header`,
`truncated_udp_header`, `bad_udp_length`.

A packet whose captured bytes end before the IP total length because the snaplen cut it (captured
length below the wire length) is kept with `truncated=True` and `end` at the captured end. When the
frame was captured whole, an IP total length beyond the frame is a lie and the packet is skipped as
`bad_ip_length`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import BinaryIO

import numba
import numpy as np

from etbert_jax.capture.reader import BATCH_RECORDS, Record, RecordBatch, iter_record_batches, source_name
from etbert_jax.capture.stats import SkipCounter

TCP = 6
UDP = 17

# TCP flag bits.
FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10

_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_PPPOE_SESSION = 0x8864
# IPv6 extension headers walked to reach TCP/UDP. Hop-by-hop (0), routing (43), destination options
# (60) and mobility (135) take (length + 1) * 8 bytes, the fragment header (44) takes 8 bytes and
# AH (51) takes (length + 2) * 4 bytes.
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
# BSD NULL/LOOP address families 24, 28 and 30 mean IPv6 (the value differs between BSDs).
_MAX_TAGS = 16
_MAX_EXTENSION_HEADERS = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Packet:
    """Header offsets and fields of one decoded TCP or UDP packet; offsets index the captured bytes."""

    # Offset of the IP header.
    ip_offset: int
    # 4 or 6.
    ip_version: int
    # Source and destination address bytes (4 or 16 bytes).
    src: bytes
    dst: bytes
    # 6 (TCP) or 17 (UDP).
    proto: int
    sport: int
    dport: int
    # Offset of the TCP or UDP header.
    l4_offset: int
    # Offset of the first payload byte after the TCP or UDP header.
    payload_offset: int
    # End of the IP packet: the IP total length, bounded by the captured bytes.
    end: int
    # TCP flag byte (0 for UDP).
    tcp_flags: int
    # TCP sequence and acknowledgement numbers (0 for UDP).
    seq: int
    ack: int
    # True when the captured bytes end before the IP total length (snaplen cut).
    truncated: bool
    # Payload length that the IP header declares (larger than end - payload_offset when truncated).
    wire_payload_len: int


def decode_packet(linktype: int, data: bytes, wire_len: int | None = None) -> Packet | str:
    """Decode one captured frame; return a `Packet` or a skip reason string.

    `wire_len` is the frame's length on the wire. When given and equal to the captured length, an IP
    total length beyond the frame is rejected as `bad_ip_length` instead of being kept as truncated.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    row = np.zeros(NUM_FIELDS, dtype=np.int64)
    status = _decode_frame(buf, 0, len(buf), -1 if wire_len is None else wire_len, linktype, row)
    if status:
        return skip_reason(status, linktype)
    return packet_from_row(data, row.tolist())


def packet_from_row(frame: bytes, row: list[int]) -> Packet:
    """Build a `Packet` from a frame and its decoded field row."""
    ip = row[IP_OFFSET]
    if row[IP_VERSION] == 4:
        src, dst = frame[ip + 12 : ip + 16], frame[ip + 16 : ip + 20]
    else:
        src, dst = frame[ip + 8 : ip + 24], frame[ip + 24 : ip + 40]
    return Packet(
        ip_offset=ip, ip_version=row[IP_VERSION], src=bytes(src), dst=bytes(dst), proto=row[PROTO],
        sport=row[SPORT], dport=row[DPORT], l4_offset=row[L4_OFFSET], payload_offset=row[PAYLOAD_OFFSET],
        end=row[END], tcp_flags=row[TCP_FLAGS], seq=row[SEQ], ack=row[ACK_NUMBER], truncated=bool(row[TRUNCATED]),
        wire_payload_len=row[WIRE_PAYLOAD_LEN],
    )


@dataclasses.dataclass(frozen=True, slots=True)
class PacketBatch:
    """Decoded TCP/UDP packets of one capture file: their records and one field row each."""

    records: RecordBatch
    # (n, NUM_FIELDS) int64; the column constants above (IP_OFFSET, PROTO, ...) index it.
    fields: np.ndarray

    def __len__(self) -> int:
        return len(self.records)

    def packet(self, row: int) -> Packet:
        """Return one packet as a `Packet`."""
        return packet_from_row(self.records.frame(row), self.fields[row].tolist())


def decode_batch(batch: RecordBatch, name: str, stats: SkipCounter) -> PacketBatch:
    """Decode a batch of records; count undecodable ones as skipped (with warnings) and drop them."""
    fields = np.zeros((len(batch), NUM_FIELDS), dtype=np.int64)
    decoded = decode_frames(batch.buf, batch.start, batch.caplen, batch.wire_len, batch.linktype, fields)
    if decoded < len(batch):
        failed = np.flatnonzero(fields[:, STATUS])
        for row, status, linktype, index, offset in zip(
                failed.tolist(), fields[failed, STATUS].tolist(), batch.linktype[failed].tolist(),
                batch.index[failed].tolist(), batch.offset[failed].tolist()):
            stats.count_skipped(skip_reason(status, linktype), name, f"packet {index} at byte offset {offset}")
        keep = fields[:, STATUS] == 0
        batch, fields = batch.take(keep), fields[keep]
    stats.count_used(decoded)
    return PacketBatch(batch, fields)


def iter_packet_batches(
    source: str | os.PathLike | BinaryIO,
    name: str | None = None,
    stats: SkipCounter | None = None,
    max_records: int = BATCH_RECORDS,
) -> Iterator[PacketBatch]:
    """Yield the decodable packets of a capture in batches; count the others as skipped.

    Each packet in a batch is counted as used, so the caller must not count it again. `name` labels
    warnings (default: the path).
    """
    name = source_name(source, name)
    stats = stats if stats is not None else SkipCounter()
    try:
        for records in iter_record_batches(source, name, stats, max_records):
            batch = decode_batch(records, name, stats)
            if len(batch):
                yield batch
    finally:
        stats.finish_file(name)


def iter_packets(
    source: str | os.PathLike | BinaryIO,
    name: str | None = None,
    stats: SkipCounter | None = None,
) -> Iterator[tuple[Record, Packet]]:
    """Yield (record, packet) for every decodable packet of a capture; count the others as skipped.

    Each yielded packet is counted as used, so the caller must not count it again. `name` labels
    warnings (default: the path).
    """
    for batch in iter_packet_batches(source, name, stats):
        for row in range(len(batch)):
            record = batch.records.record(row)
            yield record, packet_from_row(record.data, batch.fields[row].tolist())


# ---------------------------------------------------------------------------------------------------
# The compiled decoder. Every frame, batched or single, goes through `_decode_frame`.
# NOTE: numba compiles these functions on their first call in a new environment (seconds) and caches
# the machine code in __pycache__; docs/limitations.md gives the numbers.

# Columns of the int64 field table that `decode_frames` fills, one row per frame.
STATUS, IP_OFFSET, IP_VERSION, PROTO, SPORT, DPORT, L4_OFFSET, PAYLOAD_OFFSET, END, TCP_FLAGS, SEQ, ACK_NUMBER, \
    TRUNCATED, WIRE_PAYLOAD_LEN = range(14)
NUM_FIELDS = 14

# Status codes of the STATUS column: 0 decoded, otherwise an index into SKIP_REASONS.
SKIP_REASONS = (
    "",
    "truncated_link_header",
    "non_ip",
    "unsupported_linktype",
    "truncated_ip_header",
    "bad_ip_header",
    "bad_ip_length",
    "ip_fragment",
    "not_tcp_udp",
    "truncated_tcp_header",
    "bad_tcp_header",
    "truncated_udp_header",
    "bad_udp_length",
)
_TRUNCATED_LINK, _NON_IP, _UNSUPPORTED_LINKTYPE, _TRUNCATED_IP, _BAD_IP, _BAD_IP_LENGTH, _IP_FRAGMENT, \
    _NOT_TCP_UDP, _TRUNCATED_TCP, _BAD_TCP, _TRUNCATED_UDP, _BAD_UDP_LENGTH = range(1, 13)


def skip_reason(status: int, linktype: int) -> str:
    """Return the skip reason string of a nonzero status code."""
    if status == _UNSUPPORTED_LINKTYPE:
        return f"unsupported_linktype:{linktype}"
    return SKIP_REASONS[status]


@numba.njit(cache=True, inline="always")
def _u16(buf, pos):
    return (np.int64(buf[pos]) << 8) | np.int64(buf[pos + 1])


@numba.njit(cache=True, inline="always")
def _u32(buf, pos):
    return (_u16(buf, pos) << 16) | _u16(buf, pos + 2)


@numba.njit(cache=True, inline="always")
def _u16_le(buf, pos):
    return np.int64(buf[pos]) | (np.int64(buf[pos + 1]) << 8)


@numba.njit(cache=True, inline="always")
def _u32_le(buf, pos):
    return _u16_le(buf, pos) | (_u16_le(buf, pos + 2) << 16)


@numba.njit(cache=True)
def _is_vlan(ethertype):
    return ethertype == 0x8100 or ethertype == 0x88A8 or ethertype == 0x9100 or ethertype == 0x9200


@numba.njit(cache=True)
def _require_version(buf, base, n, offset, version):
    """Return (status, ip offset, version, limit) for an IP header of `version` at `offset`."""
    if offset >= n:
        return _TRUNCATED_IP, 0, 0, 0
    if (buf[base + offset] >> 4) != version:
        return _BAD_IP, 0, 0, 0
    return 0, offset, version, n


@numba.njit(cache=True)
def _by_version_nibble(buf, base, n, offset):
    if offset >= n:
        return _TRUNCATED_IP, 0, 0, 0
    version = buf[base + offset] >> 4
    if version != 4 and version != 6:
        return _BAD_IP, 0, 0, 0
    return 0, offset, np.int64(version), n


@numba.njit(cache=True)
def _from_ethertype(buf, base, n, ethertype, offset, tags):
    """Follow VLAN tags, MPLS labels and PPPoE from an EtherType at `offset - 2` to the IP header."""
    while _is_vlan(ethertype):
        tags += 1
        if offset + 4 > n or tags > _MAX_TAGS:
            return _TRUNCATED_LINK, 0, 0, 0
        ethertype = _u16(buf, base + offset + 2)
        offset += 4
    if ethertype == _ETHERTYPE_IPV4:
        return _require_version(buf, base, n, offset, 4)
    if ethertype == _ETHERTYPE_IPV6:
        return _require_version(buf, base, n, offset, 6)
    if ethertype == 0x8847 or ethertype == 0x8848:
        for _ in range(_MAX_TAGS):
            if offset + 4 > n:
                return _TRUNCATED_LINK, 0, 0, 0
            label = _u32(buf, base + offset)
            offset += 4
            if label & 0x100:  # bottom of stack
                return _by_version_nibble(buf, base, n, offset)
        return _TRUNCATED_LINK, 0, 0, 0
    if ethertype == _ETHERTYPE_PPPOE_SESSION:
        # 6-byte PPPoE header, then the 2-byte PPP protocol.
        if offset + 8 > n:
            return _TRUNCATED_LINK, 0, 0, 0
        ppp_protocol = _u16(buf, base + offset + 6)
        if ppp_protocol == 0x0021:
            return _require_version(buf, base, n, offset + 8, 4)
        if ppp_protocol == 0x0057:
            return _require_version(buf, base, n, offset + 8, 6)
    return _NON_IP, 0, 0, 0


@numba.njit(cache=True)
def _find_ip(buf, base, n, linktype):
    """Return (status, ip offset, ip version, limit) where limit bounds the IP packet."""
    if linktype == 1:  # Ethernet
        if n < 14:
            return _TRUNCATED_LINK, 0, 0, 0
        return _from_ethertype(buf, base, n, _u16(buf, base + 12), 14, 0)
    if linktype == 113:  # Linux cooked capture v1: protocol at offset 14, 16-byte header.
        if n < 16:
            return _TRUNCATED_LINK, 0, 0, 0
        return _from_ethertype(buf, base, n, _u16(buf, base + 14), 16, 0)
    if linktype == 276:  # Linux cooked capture v2: protocol at offset 0, 20-byte header.
        if n < 20:
            return _TRUNCATED_LINK, 0, 0, 0
        # A VLAN tag right behind the cooked header starts a tag stack of its own, hence tags=-1.
        return _from_ethertype(buf, base, n, _u16(buf, base), 20, -1)
    if linktype == 12 or linktype == 14 or linktype == 101:
        return _by_version_nibble(buf, base, n, 0)
    if linktype == 228:
        return _require_version(buf, base, n, 0, 4)
    if linktype == 229:
        return _require_version(buf, base, n, 0, 6)
    if linktype == 0 or linktype == 108:  # BSD NULL / LOOP
        if n < 4:
            return _TRUNCATED_LINK, 0, 0, 0
        if linktype == 108:
            family = _u32(buf, base)
        else:
            # NULL stores the family in the capturing host's byte order. Families are small numbers,
            # so a value with its low two bytes zero was written big-endian.
            family = _u32_le(buf, base)
            if family & 0xFFFF == 0:
                family >>= 24
        if family == 2:
            return _require_version(buf, base, n, 4, 4)
        if family == 24 or family == 28 or family == 30:
            return _require_version(buf, base, n, 4, 6)
        return _NON_IP, 0, 0, 0
    if linktype == 239:  # NFLOG
        # 4-byte header (family, version, resource id), then TLVs in host byte order padded to 4 bytes.
        # NOTE: the TLVs are read as little-endian, the byte order of x86 and usual ARM Linux hosts.
        if n < 4:
            return _TRUNCATED_LINK, 0, 0, 0
        family = buf[base]
        offset = 4
        while offset + 4 <= n:
            length = _u16_le(buf, base + offset)
            tlv_type = _u16_le(buf, base + offset + 2)
            if length < 4:
                return _TRUNCATED_LINK, 0, 0, 0
            # The two top bits of the type are netlink flags (nested, network byte order).
            if tlv_type & 0x3FFF == 9:  # NFULA_PAYLOAD
                stop = min(offset + length, n)
                if family == 2:
                    status, ip, version, _ = _require_version(buf, base, n, offset + 4, 4)
                elif family == 10:
                    status, ip, version, _ = _require_version(buf, base, n, offset + 4, 6)
                else:
                    return _NON_IP, 0, 0, 0
                return status, ip, version, stop
            offset += (length + 3) & ~3
        return _NON_IP, 0, 0, 0
    return _UNSUPPORTED_LINKTYPE, 0, 0, 0


@numba.njit(cache=True)
def _decode_frame(buf, base, n, wire_len, linktype, out):
    """Decode the frame buf[base:base + n] into the field row `out`; return its status."""
    status, ip, version, limit = _find_ip(buf, base, n, linktype)
    if status != 0:
        out[STATUS] = status
        return status
    # A frame counts as captured whole when the wire length is known (>= 0) and not above it.
    captured_whole = wire_len >= 0 and wire_len <= n
    first_fragment = False

    if version == 4:
        if ip + 20 > limit:
            return _set_status(out, _TRUNCATED_IP)
        version_ihl = np.int64(buf[base + ip])
        total_len = _u16(buf, base + ip + 2)
        frag = _u16(buf, base + ip + 6)
        proto = np.int64(buf[base + ip + 9])
        header_len = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or header_len < 20:
            return _set_status(out, _BAD_IP)
        if total_len == 0:
            # NOTE: a zero total length comes from captures taken before TCP segmentation offload;
            # the captured bytes are then the only length information.
            total_len = limit - ip
        if total_len < header_len:
            return _set_status(out, _BAD_IP)
        if ip + header_len > limit:
            return _set_status(out, _TRUNCATED_IP)
        if frag & 0x1FFF:
            return _set_status(out, _IP_FRAGMENT)
        first_fragment = (frag & 0x2000) != 0
        if proto != TCP and proto != UDP:
            return _set_status(out, _NOT_TCP_UDP)
        l4 = ip + header_len
        declared_end = ip + total_len
    else:
        if ip + 40 > limit:
            return _set_status(out, _TRUNCATED_IP)
        payload_len = _u16(buf, base + ip + 4)
        next_header = np.int64(buf[base + ip + 6])
        declared_end = ip + 40 + payload_len if payload_len else limit
        header_end = min(declared_end, limit)
        offset = ip + 40
        found = False
        # One pass per extension header, and one more to look at the header that follows the last.
        for _ in range(_MAX_EXTENSION_HEADERS + 1):
            if next_header == TCP or next_header == UDP:
                found = True
                break
            option_header = next_header == 0 or next_header == 43 or next_header == 60 or next_header == 135
            if option_header or next_header == _IPV6_FRAGMENT:
                size = 8
            elif next_header == _IPV6_AH:
                size = 4
            else:
                return _set_status(out, _NOT_TCP_UDP)
            if offset + 2 > header_end:
                return _set_status(out, _TRUNCATED_IP if offset + 2 > limit else _BAD_IP)
            following = np.int64(buf[base + offset])
            if option_header:
                size = (np.int64(buf[base + offset + 1]) + 1) * 8
            elif next_header == _IPV6_AH:
                size = (np.int64(buf[base + offset + 1]) + 2) * 4
            else:
                if offset + 8 > header_end:
                    return _set_status(out, _TRUNCATED_IP if offset + 8 > limit else _BAD_IP)
                fragment_field = _u16(buf, base + offset + 2)
                if fragment_field & 0xFFF8:
                    return _set_status(out, _IP_FRAGMENT)
                first_fragment = (fragment_field & 1) != 0
            if offset + size > header_end:
                return _set_status(out, _TRUNCATED_IP if offset + size > limit else _BAD_IP)
            offset += size
            next_header = following
        if not found:
            return _set_status(out, _BAD_IP)
        proto = next_header
        l4 = offset

    # Transport header.
    if declared_end > limit and captured_whole:
        return _set_status(out, _BAD_IP_LENGTH)
    end = min(declared_end, limit)
    seq = 0
    ack = 0
    flags = 0
    if proto == TCP:
        if l4 + 20 > declared_end:
            return _set_status(out, _BAD_TCP)
        if l4 + 20 > end:
            return _set_status(out, _TRUNCATED_TCP)
        header_len = (np.int64(buf[base + l4 + 12]) >> 4) * 4
        if header_len < 20 or l4 + header_len > declared_end:
            return _set_status(out, _BAD_TCP)
        if l4 + header_len > end:
            return _set_status(out, _TRUNCATED_TCP)
        seq = _u32(buf, base + l4 + 4)
        ack = _u32(buf, base + l4 + 8)
        flags = np.int64(buf[base + l4 + 13])
        payload = l4 + header_len
    else:
        if l4 + 8 > declared_end:
            return _set_status(out, _BAD_UDP_LENGTH)
        if l4 + 8 > end:
            return _set_status(out, _TRUNCATED_UDP)
        udp_len = _u16(buf, base + l4 + 4)
        # A first fragment carries only the start of the datagram, so its UDP length may exceed it.
        if udp_len < 8 or (l4 + udp_len > declared_end and not first_fragment):
            return _set_status(out, _BAD_UDP_LENGTH)
        payload = l4 + 8

    out[STATUS] = 0
    out[IP_OFFSET] = ip
    out[IP_VERSION] = version
    out[PROTO] = proto
    out[SPORT] = _u16(buf, base + l4)
    out[DPORT] = _u16(buf, base + l4 + 2)
    out[L4_OFFSET] = l4
    out[PAYLOAD_OFFSET] = payload
    out[END] = end
    out[TCP_FLAGS] = flags
    out[SEQ] = seq
    out[ACK_NUMBER] = ack
    out[TRUNCATED] = 1 if declared_end > limit else 0
    out[WIRE_PAYLOAD_LEN] = declared_end - payload
    return 0


@numba.njit(cache=True, inline="always")
def _set_status(out, status):
    out[STATUS] = status
    return status


@numba.njit(cache=True)
def decode_frames(buf, starts, caplens, wire_lens, linktypes, fields):
    """Decode every frame of a batch into `fields` (n, NUM_FIELDS); return the number decoded."""
    decoded = 0
    for row in range(starts.shape[0]):
        if _decode_frame(buf, starts[row], caplens[row], wire_lens[row], linktypes[row], fields[row]) == 0:
            decoded += 1
    return decoded
