"""Tests for etbert_jax.capture.decode: link types, IP versions, skip reasons and accounting."""

from __future__ import annotations

import logging
import struct

import pytest

from capture_frames import (
    ethernet,
    ipv4_packet,
    ipv6_packet,
    tcp_frame,
    tcp_segment,
    udp_datagram,
)
from etbert_jax.capture.decode import ACK, SYN, TCP, UDP, Packet, decode_packet, iter_packets
from etbert_jax.capture.reader import CaptureFormatError, iter_records
from etbert_jax.capture.stats import SkipCounter

V6_SRC = bytes.fromhex("20010db8000000000000000000000001")
V6_DST = bytes.fromhex("20010db8000000000000000000000002")
IPV4_TCP = ipv4_packet("192.0.2.10", "198.51.100.20", 6, tcp_segment(49152, 443, SYN | ACK, 7, 9, b"hello"))
IPV6_UDP = ipv6_packet(V6_SRC, V6_DST, 17, udp_datagram(5353, 53, b"query"))


def decoded(path, name=None):
    stats = SkipCounter()
    packets = list(iter_packets(path, name or str(path), stats))
    assert stats.is_balanced()
    return packets, stats


def check_ipv4_tcp(packet, ip_offset):
    assert isinstance(packet, Packet), packet
    assert packet.ip_offset == ip_offset
    assert packet.ip_version == 4
    assert packet.src == bytes([192, 0, 2, 10])
    assert packet.dst == bytes([198, 51, 100, 20])
    assert (packet.proto, packet.sport, packet.dport) == (TCP, 49152, 443)
    assert (packet.seq, packet.ack, packet.tcp_flags) == (7, 9, SYN | ACK)
    assert packet.l4_offset == ip_offset + 20
    assert packet.payload_offset == ip_offset + 40
    assert packet.end == ip_offset + len(IPV4_TCP)
    assert not packet.truncated


def check_ipv6_udp(packet, ip_offset):
    assert isinstance(packet, Packet), packet
    assert packet.ip_version == 6
    assert (packet.src, packet.dst) == (V6_SRC, V6_DST)
    assert (packet.proto, packet.sport, packet.dport) == (UDP, 5353, 53)
    assert packet.payload_offset == ip_offset + 48
    assert packet.end == ip_offset + len(IPV6_UDP)


def sll_header(protocol: int) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, bytes(8), protocol)


def sll2_header(protocol: int) -> bytes:
    return struct.pack("!HHIHBB8s", protocol, 0, 2, 1, 0, 6, bytes(8))


MPLS_TWO_LABELS = struct.pack("!II", (16 << 12) | 64, (17 << 12) | 0x100 | 64)
PPPOE_IPV4 = struct.pack("!BBHHH", 0x11, 0, 0x0001, len(IPV4_TCP) + 2, 0x0021)

LINK_CASES = {
    "ethernet": (1, ethernet(IPV4_TCP), 14),
    "ethernet-8021q": (1, ethernet(IPV4_TCP, tags=(0x8100,)), 18),
    "ethernet-qinq": (1, ethernet(IPV4_TCP, tags=(0x88A8, 0x8100)), 22),
    "ethernet-qinqinq": (1, ethernet(IPV4_TCP, tags=(0x9100, 0x88A8, 0x8100)), 26),
    "ethernet-mpls": (1, ethernet(MPLS_TWO_LABELS + IPV4_TCP, ethertype=0x8847), 22),
    "ethernet-pppoe": (1, ethernet(PPPOE_IPV4 + IPV4_TCP, ethertype=0x8864), 22),
    "ethernet-padded": (1, ethernet(IPV4_TCP, pad_to=len(IPV4_TCP) + 30), 14),
    "sll": (113, sll_header(0x0800) + IPV4_TCP, 16),
    "sll2": (276, sll2_header(0x0800) + IPV4_TCP, 20),
    "raw-12": (12, IPV4_TCP, 0),
    "raw-14": (14, IPV4_TCP, 0),
    "raw-101": (101, IPV4_TCP, 0),
    "ipv4-228": (228, IPV4_TCP, 0),
    "null-little-endian": (0, struct.pack("<I", 2) + IPV4_TCP, 4),
    "null-big-endian": (0, struct.pack(">I", 2) + IPV4_TCP, 4),
    "loop": (108, struct.pack(">I", 2) + IPV4_TCP, 4),
    "nflog": (239, b"\x02\x00\x00\x00" + struct.pack("<HH", 8, 1) + b"\0" * 4
              + struct.pack("<HH", 4 + len(IPV4_TCP), 9) + IPV4_TCP, 16),
}


@pytest.mark.parametrize("case", sorted(LINK_CASES))
def test_link_types_reach_ipv4_tcp(case):
    linktype, frame, ip_offset = LINK_CASES[case]
    check_ipv4_tcp(decode_packet(linktype, frame, len(frame)), ip_offset)


V6_CASES = {
    "ethernet": (1, ethernet(IPV6_UDP, ethertype=0x86DD), 14),
    "mpls": (1, ethernet(struct.pack("!I", 0x100 | 64) + IPV6_UDP, ethertype=0x8848), 18),
    "pppoe": (1, ethernet(struct.pack("!BBHHH", 0x11, 0, 1, len(IPV6_UDP) + 2, 0x0057) + IPV6_UDP,
                          ethertype=0x8864), 22),
    "sll2": (276, sll2_header(0x86DD) + IPV6_UDP, 20),
    "raw-101": (101, IPV6_UDP, 0),
    "ipv6-229": (229, IPV6_UDP, 0),
    "null-24": (0, struct.pack("<I", 24) + IPV6_UDP, 4),
    "null-28": (0, struct.pack("<I", 28) + IPV6_UDP, 4),
    "null-30-big-endian": (0, struct.pack(">I", 30) + IPV6_UDP, 4),
    "loop-30": (108, struct.pack(">I", 30) + IPV6_UDP, 4),
}


@pytest.mark.parametrize("case", sorted(V6_CASES))
def test_link_types_reach_ipv6_udp(case):
    linktype, frame, ip_offset = V6_CASES[case]
    check_ipv6_udp(decode_packet(linktype, frame, len(frame)), ip_offset)


def test_ipv6_extension_headers_walked():
    udp = udp_datagram(5353, 53, b"query")
    hop_by_hop = bytes([60, 0]) + bytes(6)  # next: destination options
    destination = bytes([43, 1]) + bytes(14)  # 16 bytes, next: routing
    routing = bytes([51, 0, 0, 0]) + bytes(4)  # next: AH
    auth = bytes([44, 1]) + bytes(10)  # (1 + 2) * 4 = 12 bytes, next: fragment
    fragment = bytes([17, 0]) + struct.pack("!HI", 0, 99)  # offset 0, no more fragments
    body = hop_by_hop + destination + routing + auth + fragment + udp
    packet = decode_packet(229, ipv6_packet(V6_SRC, V6_DST, 0, body))
    assert isinstance(packet, Packet), packet
    assert packet.l4_offset == 40 + len(body) - len(udp)
    assert (packet.sport, packet.dport) == (5353, 53)


def test_ipv6_fragments():
    udp = udp_datagram(5353, 53, b"q" * 100)
    first = ipv6_packet(V6_SRC, V6_DST, 44, bytes([17, 0]) + struct.pack("!HI", 1, 5) + udp[:40])
    later = ipv6_packet(V6_SRC, V6_DST, 44, bytes([17, 0]) + struct.pack("!HI", (40 // 8) << 3, 5) + udp[40:])
    packet = decode_packet(229, first)
    assert isinstance(packet, Packet), packet
    assert packet.sport == 5353
    assert decode_packet(229, later) == "ip_fragment"


def test_ipv4_fragments():
    udp = udp_datagram(5000, 53, b"q" * 100)
    first = ipv4_packet("192.0.2.1", "192.0.2.2", 17, udp[:48], frag=0x2000)
    later = ipv4_packet("192.0.2.1", "192.0.2.2", 17, udp[48:], frag=6)
    assert isinstance(decode_packet(228, first), Packet)
    assert decode_packet(228, later) == "ip_fragment"


@pytest.mark.parametrize("count, expected", [(16, "udp"), (17, "bad_ip_header")])
def test_ipv6_extension_header_limit(count, expected):
    # A chain of `count` 8-byte destination-options headers, the last one followed by UDP.
    headers = b"".join(bytes([60 if i < count - 1 else 17, 0]) + bytes(6) for i in range(count))
    packet = decode_packet(229, ipv6_packet(V6_SRC, V6_DST, 60, headers + udp_datagram(5353, 53, b"q")))
    if expected == "udp":
        assert isinstance(packet, Packet), packet
        assert (packet.sport, packet.dport) == (5353, 53)
    else:
        assert packet == expected


SKIP_CASES = {
    "arp": (1, ethernet(bytes(28), ethertype=0x0806), "non_ip"),
    "llc": (1, ethernet(bytes(40), ethertype=100), "non_ip"),
    "short-ethernet": (1, bytes(10), "truncated_link_header"),
    "radiotap": (127, bytes(60), "unsupported_linktype:127"),
    "wlan": (105, bytes(60), "unsupported_linktype:105"),
    "icmp": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 1, bytes(8)), "not_tcp_udp"),
    "gre": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 47, bytes(8)), "not_tcp_udp"),
    "esp": (229, ipv6_packet(V6_SRC, V6_DST, 50, bytes(16)), "not_tcp_udp"),
    "version-7": (1, ethernet(b"\x75" + IPV4_TCP[1:]), "bad_ip_header"),
    "ihl-4": (228, b"\x44" + IPV4_TCP[1:], "bad_ip_header"),
    "ihl-15": (228, b"\x4f" + IPV4_TCP[1:], "bad_ip_header"),
    "total-below-header": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp_segment(1, 2, ACK), total_len=12),
                           "bad_ip_header"),
    "total-above-frame": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp_segment(1, 2, ACK), total_len=900),
                          "bad_ip_length"),
    "short-ipv4": (228, IPV4_TCP[:12], "truncated_ip_header"),
    "tcp-offset-2": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 6,
                                      tcp_segment(1, 2, ACK)[:12] + b"\x20" + bytes(7)), "bad_tcp_header"),
    "tcp-offset-15": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 6,
                                       tcp_segment(1, 2, ACK)[:12] + b"\xf0" + bytes(7)), "bad_tcp_header"),
    "udp-length-999": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 17, udp_datagram(1, 2, b"x", length=999)),
                       "bad_udp_length"),
    "udp-length-4": (228, ipv4_packet("192.0.2.1", "192.0.2.2", 17, udp_datagram(1, 2, b"x", length=4)),
                     "bad_udp_length"),
    "null-unknown-family": (0, struct.pack("<I", 7) + IPV4_TCP, "non_ip"),
    "pppoe-lcp": (1, ethernet(struct.pack("!BBHHH", 0x11, 0, 1, 10, 0xC021) + bytes(8), ethertype=0x8864),
                  "non_ip"),
}


@pytest.mark.parametrize("case", sorted(SKIP_CASES))
def test_skip_reasons(case):
    linktype, frame, reason = SKIP_CASES[case]
    assert decode_packet(linktype, frame, len(frame)) == reason


def test_snaplen_cut_kept_as_truncated():
    frame = tcp_frame("192.0.2.1", "192.0.2.2", 40000, 443, ACK, payload=b"p" * 200)
    cut = frame[:96]
    packet = decode_packet(1, cut, wire_len=len(frame))
    assert isinstance(packet, Packet), packet
    assert packet.truncated
    assert packet.end == 96
    assert packet.wire_payload_len == 200
    # A header cut inside the TCP header cannot be decoded.
    assert decode_packet(1, frame[:40], wire_len=len(frame)) == "truncated_tcp_header"


def test_tso_zero_total_length_uses_captured_bytes():
    frame = ethernet(ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp_segment(1, 2, ACK, payload=b"x" * 30), total_len=0))
    packet = decode_packet(1, frame, len(frame))
    assert isinstance(packet, Packet), packet
    assert packet.end == len(frame)


@pytest.mark.parametrize(
    "relative, linktype, min_used",
    [
        ("edge-linux-sll/zeek-irc-starttls-sll.pcap", 113, 20),
        ("edge-linux-sll2/suricata-decode-sll2.pcap", 276, 5),
        ("edge-null-loopback/zeek-pop3-starttls-null.pcap", 0, 33),
        ("edge-raw-ip/tcpdump-linktype-ipv4.pcap", 228, 1),
        ("edge-raw-ip/tcpdump-linktype-raw-ipv4.pcap", 101, 1),
        ("edge-raw-ip/tcpdump-linktype-raw-ipv6.pcap", 101, 1),
        ("edge-raw-ip/zeek-tls-ml-dsa-cert-rawip.pcap", 101, 5),
        ("edge-nflog/zeek-nflog-http.pcap", 239, 13),
        ("edge-vlan/zeek-http-vlan.pcap", 1, 14),
        ("edge-vlan/zeek-vlan-qinqinq.pcap", 1, 14),
        ("edge-vlan/zeek-q-in-q.pcap", 1, 4),
        ("edge-vlan/arkime-twovlan.pcap", 1, 6),
        ("edge-ipv6-ext-headers/zeek-ipv6-hbh-routing0.pcap", 1, 1),
        ("edge-tunnels/zeek-pppoe.pcap", 1, 4),
        ("edge-pcapng-bigendian/hadrielk-pcapng-be-advanced.pcapng", 1, 0),
    ],
)
def test_corpus_link_types(shared_pcaps, relative, linktype, min_used):
    path = shared_pcaps / relative
    records = list(iter_records(path))
    assert linktype in {r.linktype for r in records}
    packets, stats = decoded(path)
    assert len(packets) >= min_used
    assert stats.packets_read == len(records)
    for record, packet in packets:
        assert packet.l4_offset > packet.ip_offset
        assert packet.payload_offset <= packet.end <= len(record.data)


def test_pppoe_session_traffic_is_ipv6(shared_pcaps):
    packets, stats = decoded(shared_pcaps / "edge-tunnels" / "zeek-pppoe.pcap")
    assert {p.ip_version for _, p in packets} == {6}
    assert {p.ip_offset for _, p in packets} == {22}
    assert stats.packets_skipped["non_ip"] > 0


def test_unsupported_link_type_counted(shared_pcaps, caplog):
    path = shared_pcaps / "edge-80211" / "arkime-80211-http.pcap"
    with caplog.at_level(logging.WARNING):
        packets, stats = decoded(path, "radiotap.pcap")
    assert packets == []
    assert stats.packets_skipped == {"unsupported_linktype:127": 26}
    per_packet = [m for m in caplog.messages if "unsupported_linktype:127" in m and "packet " in m]
    # Warnings are rate-limited per file and reason: five lines, then one summary.
    assert len(per_packet) == 5
    assert any("21 more packets skipped" in m for m in caplog.messages)


def test_fragments_corpus(shared_pcaps):
    _, stats = decoded(shared_pcaps / "edge-ip-fragments" / "suricata-ipv4frags.pcap")
    assert stats.packets_skipped["ip_fragment"] >= 1
    packets, stats = decoded(shared_pcaps / "edge-ip-fragments" / "zeek-ipv6-fragmented-dns.pcap")
    assert stats.packets_skipped["ip_fragment"] >= 1
    assert all(p.proto == UDP for _, p in packets)


def test_accounting_over_whole_corpus(shared_pcaps, hard_cases):
    paths = sorted(shared_pcaps.rglob("*.pcap*")) + sorted(hard_cases.rglob("*.pcap*"))
    total = SkipCounter()
    for path in paths:
        stats = SkipCounter(warn_limit=0)
        try:
            used = sum(1 for _ in iter_packets(path, path.name, stats))
        except CaptureFormatError:
            continue
        assert stats.packets_read == stats.packets_used + stats.total_skipped, path
        assert stats.packets_used == used, path
        total.merge(stats)
    assert total.is_balanced()
    assert total.packets_used > 50_000
