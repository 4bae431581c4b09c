"""Tests for etbert_jax.capture.headers: which bytes each header policy keeps and which it blanks."""

from __future__ import annotations

import struct

import pytest

from capture_frames import ethernet, ipv4_packet, ipv6_packet, tcp_segment, udp_datagram
from etbert_jax.capture.decode import ACK, SYN, TCP, Packet, decode_packet, iter_packets
from etbert_jax.capture.headers import (
    ETBERT_BURST_BYTES,
    ETBERT_FINETUNE_OFFSET,
    apply_header_policy,
    etbert_burst_bytes,
    etbert_finetune_bytes,
    relative_sequence,
)
from etbert_jax.capture.options import HEADER_POLICIES
from etbert_jax.capture.sessions import PacketBytes, SessionOptions, SessionTable
from etbert_jax.capture.stats import SkipCounter

V6_SRC = bytes.fromhex("20010db8000000000000000000000001")
V6_DST = bytes.fromhex("20010db8000000000000000000000002")
TIMESTAMP_OPTION = bytes([1, 1, 8, 10]) + struct.pack("!II", 0xAABBCCDD, 0x11223344)
MSS_OPTION = bytes([2, 4]) + struct.pack("!H", 1460)
IPV4_OPTIONS = bytes([7, 7, 4]) + bytes(4) + bytes([0])  # record route + end of list


def expected_zero_ranges(packet: Packet) -> list[tuple[int, int]]:
    """Byte ranges (relative to the IP header) that anonymize must zero, seq/ack excluded."""
    l4 = packet.l4_offset - packet.ip_offset
    if packet.ip_version == 4:
        ranges = [(4, 6), (8, 9), (10, 12), (12, 20)]
    else:
        ranges = [(2, 4), (7, 8), (8, 40)]
    ranges.append((l4, l4 + 4))
    ranges.append((l4 + 16, l4 + 18) if packet.proto == TCP else (l4 + 6, l4 + 8))
    return ranges


def timestamp_value_ranges(data: bytes, packet: Packet) -> list[tuple[int, int]]:
    """Find TSval/TSecr ranges by scanning the options independently of the code under test."""
    start = packet.l4_offset + 20 - packet.ip_offset
    stop = packet.payload_offset - packet.ip_offset
    found = []
    pos = start
    while pos < stop and data[pos] != 0:
        if data[pos] == 1:
            pos += 1
            continue
        if data[pos] == 8:
            found.append((pos + 2, pos + 10))
        pos += max(data[pos + 1], 2)
    return found


def check_anonymized(frame: bytes, packet: Packet, seq_base) -> bytes:
    plain = apply_header_policy("strip-link", frame, packet)
    anonymized = apply_header_policy("anonymize", frame, packet, seq_base)
    assert len(anonymized) == len(plain)

    changed = set()
    for start, stop in expected_zero_ranges(packet) + timestamp_value_ranges(plain, packet):
        assert anonymized[start:stop] == bytes(stop - start), (start, stop)
        changed.update(range(start, stop))
    if packet.ip_version == 6:
        assert anonymized[1] == plain[1] & 0xF0
        assert anonymized[0] == plain[0]
        changed.add(1)
    if packet.proto == TCP:
        l4 = packet.l4_offset - packet.ip_offset
        seq, ack = struct.unpack_from("!II", anonymized, l4 + 4)
        assert seq == relative_sequence(packet.seq, seq_base[0])
        assert ack == (relative_sequence(packet.ack, seq_base[1]) if packet.tcp_flags & ACK else 0)
        changed.update(range(l4 + 4, l4 + 12))
    for i in range(len(plain)):
        if i not in changed:
            assert anonymized[i] == plain[i], i
    return anonymized


def test_anonymize_ipv4_tcp_with_options():
    tcp = tcp_segment(40000, 443, ACK, seq=1000, ack=5000, payload=b"secret", options=MSS_OPTION + TIMESTAMP_OPTION)
    frame = ethernet(ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp, options=IPV4_OPTIONS), pad_to=120)
    packet = decode_packet(1, frame, len(frame))
    out = check_anonymized(frame, packet, (900, 4000))
    ip_header = 20 + len(IPV4_OPTIONS)
    assert len(out) == ip_header + len(tcp)  # no Ethernet padding
    assert out[20:ip_header] == IPV4_OPTIONS  # IPv4 options stay
    assert out.endswith(b"secret")
    assert struct.unpack_from("!II", out, ip_header + 4) == (100, 1000)
    ts_start = ip_header + 20 + len(MSS_OPTION) + 4
    assert out[ts_start : ts_start + 8] == bytes(8)


def test_anonymize_ipv6_udp():
    frame = ethernet(ipv6_packet(V6_SRC, V6_DST, 17, udp_datagram(5353, 53, b"q" * 10), flow_label=0xABCDE),
                     ethertype=0x86DD)
    packet = decode_packet(1, frame, len(frame))
    out = check_anonymized(frame, packet, (None, None))
    assert out[0] >> 4 == 6


def test_anonymize_unknown_base_and_no_ack():
    tcp = tcp_segment(40000, 443, SYN, seq=123456, ack=999)
    frame = ethernet(ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp))
    packet = decode_packet(1, frame, len(frame))
    out = check_anonymized(frame, packet, (None, None))
    assert struct.unpack_from("!II", out, 24) == (0, 0)


def test_relative_sequence_wraps():
    assert relative_sequence(5, 0xFFFFFFFE) == 7
    assert relative_sequence(10, None) == 0


def test_malformed_tcp_options_left_alone():
    options = bytes([8, 10]) + bytes(8) + bytes([3, 40])  # timestamp, then an option running past the header
    tcp = tcp_segment(1, 2, ACK, options=options + bytes(2))
    frame = ethernet(ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp))
    packet = decode_packet(1, frame, len(frame))
    out = apply_header_policy("anonymize", frame, packet, (0, 0))
    assert out[40:42] == bytes([8, 10])
    assert out[50:52] == bytes([3, 40])


@pytest.mark.parametrize(
    "relative",
    ["tls12/zeek-tls12-ecdhe.pcap", "app-tumblr/ndpi-tumblr.pcap", "edge-vlan/zeek-vlan-qinqinq.pcap",
     "edge-raw-ip/tcpdump-linktype-raw-ipv6.pcap"],
)
def test_anonymize_corpus_packets(shared_pcaps, relative):
    stats = SkipCounter(warn_limit=0)
    count = 0
    for record, packet in iter_packets(shared_pcaps / relative, relative, stats):
        check_anonymized(record.data, packet, (packet.seq - 1, packet.ack - 1))
        count += 1
        if count == 200:
            break
    assert count > 0


def test_relative_seq_ack_through_session_table(hard_cases):
    path = hard_cases / "01-pcapng-tcp-session" / "tcp_udp_session.pcapng"
    table = SessionTable(SessionOptions(), "anonymize", keep_bytes_burst=0, emit_packets=True)
    events = []
    for record, packet in iter_packets(path, path.name, SkipCounter()):
        events.extend(table.add(record.ts_ns, packet, record.data, path.name, record.index))
    events.extend(table.close_all())
    tcp = [e for e in events if isinstance(e, PacketBytes) and e.session_key[0] == TCP]
    seq_ack = [struct.unpack_from("!II", e.data, 24) for e in tcp]
    # Handshake: SYN (0, 0), SYN-ACK (0, 1), ACK (1, 1).
    assert seq_ack[:3] == [(0, 0), (0, 1), (1, 1)]
    # The client's last sequence number counts its SYN, its 77 payload bytes and its FIN.
    client = [sa for e, sa in zip(tcp, seq_ack) if e.direction == 0]
    assert client[-1][0] == 1 + 77 + 1
    assert all(e.data[12:20] == bytes(8) for e in tcp)


def test_policy_byte_ranges():
    tcp = tcp_segment(40000, 443, ACK, seq=1, ack=2, payload=b"abc")
    ip = ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp)
    frame = ethernet(ip, tags=(0x8100,), pad_to=64)
    packet = decode_packet(1, frame, len(frame))
    assert apply_header_policy("strip-link", frame, packet) == ip
    assert apply_header_policy("raw", frame, packet) == frame[: 18 + len(ip)]
    assert apply_header_policy("etbert", frame, packet) == frame
    assert len(apply_header_policy("anonymize", frame, packet)) == len(ip)
    assert etbert_burst_bytes(frame) == frame[:ETBERT_BURST_BYTES]
    assert etbert_finetune_bytes(frame) == frame[ETBERT_FINETUNE_OFFSET:]
    assert ETBERT_FINETUNE_OFFSET == 14 + 20 + 4


def test_truncated_packet_policies_stop_at_captured_end():
    tcp = tcp_segment(40000, 443, ACK, payload=b"p" * 300)
    frame = ethernet(ipv4_packet("192.0.2.1", "192.0.2.2", 6, tcp))
    cut = frame[:96]
    packet = decode_packet(1, cut, len(frame))
    for policy in HEADER_POLICIES:
        out = apply_header_policy(policy, cut, packet, (0, 0))
        assert len(out) <= 96, policy
    assert apply_header_policy("strip-link", cut, packet) == cut[14:]


def test_unknown_policy_rejected():
    frame = ethernet(ipv4_packet("192.0.2.1", "192.0.2.2", 17, udp_datagram(1, 2)))
    packet = decode_packet(1, frame)
    with pytest.raises(ValueError, match="anonymize"):
        apply_header_policy("strip-all", frame, packet)
