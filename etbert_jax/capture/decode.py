"""Decode link-layer, IP and TCP/UDP headers of one captured frame into offsets and fields.

`decode_packet(linktype, data, wire_len)` returns a `Packet` or a skip reason string. It reads headers
with `struct.unpack_from` straight from the captured bytes and copies nothing.

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
import struct
from collections.abc import Iterator
from typing import BinaryIO

from etbert_jax.capture.reader import Record, iter_records, source_name
from etbert_jax.capture.stats import SkipCounter

TCP = 6
UDP = 17

# TCP flag bits.
FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10

_VLAN_TYPES = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))
_MPLS_TYPES = frozenset((0x8847, 0x8848))
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_PPPOE_SESSION = 0x8864
# IPv6 extension headers walked to reach TCP/UDP: hop-by-hop, routing, destination options, mobility.
_IPV6_OPTION_HEADERS = frozenset((0, 43, 60, 135))
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
# BSD NULL/LOOP address families that mean IPv6 (the value differs between BSDs).
_BSD_AF_INET6 = frozenset((24, 28, 30))
_MAX_TAGS = 16
_MAX_EXTENSION_HEADERS = 16

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
# Header layouts unpacked for every packet, compiled once.
_IPV4_HEADER = struct.Struct("!BBHHHBB")
_IPV6_LENGTH_NEXT = struct.Struct("!HB")
_TCP_HEADER = struct.Struct("!HHIIBB")
_UDP_HEADER = struct.Struct("!HHH")


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
    found = _find_ip(linktype, data)
    if isinstance(found, str):
        return found
    ip_offset, version, ip_limit = found
    captured_whole = wire_len is not None and wire_len <= len(data)
    if version == 4:
        return _decode_ipv4(data, ip_offset, ip_limit, captured_whole)
    return _decode_ipv6(data, ip_offset, ip_limit, captured_whole)


def iter_packets(
    source: str | os.PathLike | BinaryIO,
    name: str | None = None,
    stats: SkipCounter | None = None,
) -> Iterator[tuple[Record, Packet]]:
    """Yield (record, packet) for every decodable packet of a capture; count the others as skipped.

    Each yielded packet is counted as used, so the caller must not count it again. `name` labels
    warnings (default: the path).
    """
    name = source_name(source, name)
    stats = stats if stats is not None else SkipCounter()
    try:
        for record in iter_records(source, name, stats):
            packet = decode_packet(record.linktype, record.data, record.wire_len)
            if isinstance(packet, str):
                stats.count_skipped(packet, name, f"packet {record.index} at byte offset {record.offset}")
                continue
            stats.count_used()
            yield record, packet
    finally:
        stats.finish_file(name)


# ---------------------------------------------------------------------------------------------------
# Link layer: find where the IP header starts.


def _find_ip(linktype: int, data: bytes) -> tuple[int, int, int] | str:
    """Return (ip_offset, ip_version, limit) where limit bounds the IP packet, or a skip reason."""
    n = len(data)
    if linktype == 1:
        if n < 14:
            return "truncated_link_header"
        return _from_ethertype(data, 12)
    if linktype == 113:  # Linux cooked capture v1: protocol at offset 14, 16-byte header.
        if n < 16:
            return "truncated_link_header"
        return _from_ethertype(data, 14)
    if linktype == 276:  # Linux cooked capture v2: protocol at offset 0, 20-byte header.
        if n < 20:
            return "truncated_link_header"
        return _dispatch_ethertype(data, _U16.unpack_from(data, 0)[0], 20)
    if linktype in (12, 14, 101):
        return _by_version_nibble(data, 0)
    if linktype == 228:
        return _require_version(data, 0, 4)
    if linktype == 229:
        return _require_version(data, 0, 6)
    if linktype in (0, 108):
        return _from_bsd_family(linktype, data)
    if linktype == 239:
        return _from_nflog(data)
    return f"unsupported_linktype:{linktype}"


def _from_ethertype(data: bytes, type_offset: int) -> tuple[int, int, int] | str:
    ethertype = _U16.unpack_from(data, type_offset)[0]
    offset = type_offset + 2
    tags = 0
    while ethertype in _VLAN_TYPES:
        tags += 1
        if offset + 4 > len(data) or tags > _MAX_TAGS:
            return "truncated_link_header"
        ethertype = _U16.unpack_from(data, offset + 2)[0]
        offset += 4
    return _dispatch_ethertype(data, ethertype, offset)


def _dispatch_ethertype(data: bytes, ethertype: int, offset: int) -> tuple[int, int, int] | str:
    if ethertype == _ETHERTYPE_IPV4:
        return _require_version(data, offset, 4)
    if ethertype == _ETHERTYPE_IPV6:
        return _require_version(data, offset, 6)
    if ethertype in _VLAN_TYPES:
        # A tag behind a cooked-capture header.
        if offset + 4 > len(data):
            return "truncated_link_header"
        return _from_ethertype(data, offset + 2)
    if ethertype in _MPLS_TYPES:
        for _ in range(_MAX_TAGS):
            if offset + 4 > len(data):
                return "truncated_link_header"
            label = _U32.unpack_from(data, offset)[0]
            offset += 4
            if label & 0x100:  # bottom of stack
                return _by_version_nibble(data, offset)
        return "truncated_link_header"
    if ethertype == _ETHERTYPE_PPPOE_SESSION:
        # 6-byte PPPoE header, then the 2-byte PPP protocol.
        if offset + 8 > len(data):
            return "truncated_link_header"
        ppp_protocol = _U16.unpack_from(data, offset + 6)[0]
        if ppp_protocol == 0x0021:
            return _require_version(data, offset + 8, 4)
        if ppp_protocol == 0x0057:
            return _require_version(data, offset + 8, 6)
        return "non_ip"
    return "non_ip"


def _by_version_nibble(data: bytes, offset: int) -> tuple[int, int, int] | str:
    if offset >= len(data):
        return "truncated_ip_header"
    version = data[offset] >> 4
    if version not in (4, 6):
        return "bad_ip_header"
    return offset, version, len(data)


def _require_version(data: bytes, offset: int, version: int) -> tuple[int, int, int] | str:
    if offset >= len(data):
        return "truncated_ip_header"
    if data[offset] >> 4 != version:
        return "bad_ip_header"
    return offset, version, len(data)


def _from_bsd_family(linktype: int, data: bytes) -> tuple[int, int, int] | str:
    if len(data) < 4:
        return "truncated_link_header"
    if linktype == 108:
        family = _U32.unpack_from(data, 0)[0]
    else:
        # NULL stores the family in the capturing host's byte order. Families are small numbers, so a
        # value with its low two bytes zero was written big-endian.
        family = struct.unpack_from("<I", data, 0)[0]
        if family & 0xFFFF == 0:
            family >>= 24
    if family == 2:
        return _require_version(data, 4, 4)
    if family in _BSD_AF_INET6:
        return _require_version(data, 4, 6)
    return "non_ip"


def _from_nflog(data: bytes) -> tuple[int, int, int] | str:
    # 4-byte header (family, version, resource id), then TLVs in host byte order padded to 4 bytes.
    # NOTE: the TLVs are read as little-endian, the byte order of x86 and usual ARM Linux hosts.
    if len(data) < 4:
        return "truncated_link_header"
    family = data[0]
    offset = 4
    while offset + 4 <= len(data):
        length, tlv_type = struct.unpack_from("<HH", data, offset)
        if length < 4:
            return "truncated_link_header"
        # The two top bits of the type are netlink flags (nested, network byte order).
        if tlv_type & 0x3FFF == 9:  # NFULA_PAYLOAD
            start, stop = offset + 4, min(offset + length, len(data))
            if family == 2:
                found = _require_version(data, start, 4)
            elif family == 10:
                found = _require_version(data, start, 6)
            else:
                return "non_ip"
            if isinstance(found, str):
                return found
            return found[0], found[1], stop
        offset += (length + 3) & ~3
    return "non_ip"


# ---------------------------------------------------------------------------------------------------
# IP and transport headers.


def _decode_ipv4(data: bytes, ip: int, limit: int, captured_whole: bool) -> Packet | str:
    if ip + 20 > limit:
        return "truncated_ip_header"
    version_ihl, _, total_len, _, frag, _, proto = _IPV4_HEADER.unpack_from(data, ip)
    header_len = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header_len < 20:
        return "bad_ip_header"
    if total_len == 0:
        # NOTE: a zero total length comes from captures taken before TCP segmentation offload; the
        # captured bytes are then the only length information.
        total_len = limit - ip
    if total_len < header_len:
        return "bad_ip_header"
    if ip + header_len > limit:
        return "truncated_ip_header"
    if frag & 0x1FFF:
        return "ip_fragment"
    first_fragment = bool(frag & 0x2000)
    if proto not in (TCP, UDP):
        return "not_tcp_udp"
    src = data[ip + 12 : ip + 16]
    dst = data[ip + 16 : ip + 20]
    return _decode_transport(
        data, ip, 4, src, dst, proto, ip + header_len, ip + total_len, limit, captured_whole,
        first_fragment,
    )


def _decode_ipv6(data: bytes, ip: int, limit: int, captured_whole: bool) -> Packet | str:
    if ip + 40 > limit:
        return "truncated_ip_header"
    payload_len, next_header = _IPV6_LENGTH_NEXT.unpack_from(data, ip + 4)
    declared_end = ip + 40 + payload_len if payload_len else limit
    header_end = min(declared_end, limit)
    offset = ip + 40
    first_fragment = False
    for _ in range(_MAX_EXTENSION_HEADERS):
        if next_header in (TCP, UDP):
            break
        if next_header in _IPV6_OPTION_HEADERS:
            size = 8
        elif next_header == _IPV6_AH:
            size = 4
        elif next_header == _IPV6_FRAGMENT:
            size = 8
        else:
            return "not_tcp_udp"
        if offset + 2 > header_end:
            return "truncated_ip_header" if offset + 2 > limit else "bad_ip_header"
        following = data[offset]
        if next_header in _IPV6_OPTION_HEADERS:
            size = (data[offset + 1] + 1) * 8
        elif next_header == _IPV6_AH:
            size = (data[offset + 1] + 2) * 4
        else:
            if offset + 8 > header_end:
                return "truncated_ip_header" if offset + 8 > limit else "bad_ip_header"
            fragment_field = _U16.unpack_from(data, offset + 2)[0]
            if fragment_field & 0xFFF8:
                return "ip_fragment"
            first_fragment = bool(fragment_field & 1)
        if offset + size > header_end:
            return "truncated_ip_header" if offset + size > limit else "bad_ip_header"
        offset += size
        next_header = following
    else:
        return "bad_ip_header"
    src = data[ip + 8 : ip + 24]
    dst = data[ip + 24 : ip + 40]
    return _decode_transport(
        data, ip, 6, src, dst, next_header, offset, declared_end, limit, captured_whole, first_fragment
    )


def _decode_transport(
    data: bytes,
    ip: int,
    version: int,
    src: bytes,
    dst: bytes,
    proto: int,
    l4: int,
    declared_end: int,
    limit: int,
    captured_whole: bool,
    first_fragment: bool,
) -> Packet | str:
    if declared_end > limit and captured_whole:
        return "bad_ip_length"
    end = min(declared_end, limit)
    truncated = declared_end > limit

    if proto == TCP:
        if l4 + 20 > declared_end:
            return "bad_tcp_header"
        if l4 + 20 > end:
            return "truncated_tcp_header"
        sport, dport, seq, ack, offset_byte, flags = _TCP_HEADER.unpack_from(data, l4)
        header_len = (offset_byte >> 4) * 4
        if header_len < 20 or l4 + header_len > declared_end:
            return "bad_tcp_header"
        if l4 + header_len > end:
            return "truncated_tcp_header"
        payload = l4 + header_len
    else:
        if l4 + 8 > declared_end:
            return "bad_udp_length"
        if l4 + 8 > end:
            return "truncated_udp_header"
        sport, dport, udp_len = _UDP_HEADER.unpack_from(data, l4)
        # A first fragment carries only the start of the datagram, so its UDP length may exceed it.
        if udp_len < 8 or (l4 + udp_len > declared_end and not first_fragment):
            return "bad_udp_length"
        seq = ack = flags = 0
        payload = l4 + 8

    return Packet(
        ip_offset=ip,
        ip_version=version,
        src=bytes(src),
        dst=bytes(dst),
        proto=proto,
        sport=sport,
        dport=dport,
        l4_offset=l4,
        payload_offset=payload,
        end=end,
        tcp_flags=flags,
        seq=seq,
        ack=ack,
        truncated=truncated,
        wire_payload_len=declared_end - payload,
    )
