"""Builders for small synthetic frames and capture files used by the capture-layer tests.

Checksums are left at zero: the capture layer never verifies them.
"""

from __future__ import annotations

import gzip
import struct

ETH_SRC = bytes.fromhex("020000000001")
ETH_DST = bytes.fromhex("020000000002")


def ipv4_packet(src: str, dst: str, proto: int, l4: bytes, ttl: int = 64, ident: int = 0x1234,
                options: bytes = b"", total_len: int | None = None, frag: int = 0x4000) -> bytes:
    header_len = 20 + len(options)
    length = header_len + len(l4) if total_len is None else total_len
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | (header_len // 4), 0, length, ident, frag, ttl, proto, 0xBEEF,
        bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))),
    )
    return header + options + l4


def ipv6_packet(src: bytes, dst: bytes, next_header: int, body: bytes, flow_label: int = 0x12345,
                hop_limit: int = 64) -> bytes:
    first_word = (6 << 28) | flow_label
    return struct.pack("!IHBB16s16s", first_word, len(body), next_header, hop_limit, src, dst) + body


def tcp_segment(sport: int, dport: int, flags: int, seq: int = 0, ack: int = 0, payload: bytes = b"",
                options: bytes = b"") -> bytes:
    header_len = 20 + len(options)
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (header_len // 4) << 4, flags, 65535, 0xCAFE, 0)
    return header + options + payload


def udp_datagram(sport: int, dport: int, payload: bytes = b"", length: int | None = None) -> bytes:
    size = 8 + len(payload) if length is None else length
    return struct.pack("!HHHH", sport, dport, size, 0xCAFE) + payload


def ethernet(ip: bytes, ethertype: int = 0x0800, tags: tuple[int, ...] = (), pad_to: int = 0) -> bytes:
    """Return an Ethernet frame; `tags` are tag ethertypes, outermost first, each with VLAN id 100."""
    frame = ETH_DST + ETH_SRC
    for tag in tags:
        frame += struct.pack("!HH", tag, 100)
    frame += struct.pack("!H", ethertype) + ip
    if len(frame) < pad_to:
        frame += bytes(pad_to - len(frame))
    return frame


def tcp_frame(src: str, dst: str, sport: int, dport: int, flags: int, seq: int = 0, ack: int = 0,
              payload: bytes = b"") -> bytes:
    return ethernet(ipv4_packet(src, dst, 6, tcp_segment(sport, dport, flags, seq, ack, payload)))


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    return ethernet(ipv4_packet(src, dst, 17, udp_datagram(sport, dport, payload)))


def pcap_bytes(frames: list[tuple[int, bytes]], linktype: int = 1, snaplen: int = 65535,
               order: str = "<", nanosecond: bool = False) -> bytes:
    """Return a classic pcap file holding (ts_ns, frame) records."""
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for ts_ns, frame in frames:
        seconds, rest = divmod(ts_ns, 1_000_000_000)
        fraction = rest if nanosecond else rest // 1000
        out += struct.pack(order + "IIII", seconds, fraction, len(frame), len(frame)) + frame
    return out


def pcap_record(ts_sec: int, caplen: int, wire_len: int, data: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "IIII", ts_sec, 0, caplen, wire_len) + data


def pcapng_block(block_type: int, body: bytes, order: str = "<") -> bytes:
    body += bytes(-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def pcapng_section(order: str = "<") -> bytes:
    body = struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    return pcapng_block(0x0A0D0D0A, body, order)


def pcapng_interface(linktype: int = 1, snaplen: int = 0, tsresol: int | None = None,
                     tsoffset: int | None = None, order: str = "<") -> bytes:
    body = struct.pack(order + "HHI", linktype, 0, snaplen)
    if tsresol is not None:
        body += struct.pack(order + "HHB3x", 9, 1, tsresol)
    if tsoffset is not None:
        body += struct.pack(order + "HHq", 14, 8, tsoffset)
    if tsresol is not None or tsoffset is not None:
        body += struct.pack(order + "HH", 0, 0)
    return pcapng_block(1, body, order)


def pcapng_epb(interface: int, units: int, frame: bytes, order: str = "<") -> bytes:
    body = struct.pack(order + "IIIII", interface, units >> 32, units & 0xFFFFFFFF, len(frame), len(frame))
    return pcapng_block(6, body + frame, order)


def pcapng_spb(frame: bytes, wire_len: int | None = None, order: str = "<") -> bytes:
    size = len(frame) if wire_len is None else wire_len
    return pcapng_block(3, struct.pack(order + "I", size) + frame, order)


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)
