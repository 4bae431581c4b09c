"""The capture layer on every hard case: each expectation of a case's README is an assert here."""

from __future__ import annotations

import logging
import re

from capture_frames import pcap_bytes
from etbert_jax.capture.decode import iter_packets
from etbert_jax.capture.headers import apply_header_policy
from etbert_jax.capture.options import SessionOptions
from etbert_jax.capture.reader import iter_records
from etbert_jax.capture.sessions import Burst, SessionEnd, collect_sessions, iter_sessions
from etbert_jax.capture.stats import SkipCounter

BASE_TCP = "tcp 192.0.2.10:49152>198.51.100.20:80"
BASE_UDP = "udp 192.0.2.10:53000>198.51.100.53:53"


def sessions_of(paths, names=None, **kwargs):
    stats = SkipCounter()
    events = list(iter_sessions([str(p) for p in paths], stats=stats, names=names, **kwargs))
    sessions, bursts = collect_sessions(events)
    return sessions, bursts, stats, events


def summary(sessions):
    return [(s.name, s.packets, s.payload_bytes) for s in sessions]


def policy_bytes(path, policy="strip-link"):
    packets = iter_packets(path, path.name, SkipCounter())
    return [apply_header_policy(policy, r.data, p, (0, 0)) for r, p in packets]


def ip_bytes_without_id(path):
    """IP-and-above bytes with the IPv4 identification and header checksum masked.

    The synthetic hard cases were written with different IP IDs per file, so these two fields are the
    only ones that may differ between two link-layer versions of the same exchange.
    """
    masked = []
    for data in policy_bytes(path):
        data = bytearray(data)
        data[4:6] = data[10:12] = b"\0\0"
        masked.append(bytes(data))
    return masked


BASE_SUMMARY = [(BASE_TCP, [6, 5], [77, 2000]), (BASE_UDP, [1, 1], [33, 64])]


def test_01_pcapng_equals_pcap(hard_cases, tmp_path):
    pcapng = hard_cases / "01-pcapng-tcp-session" / "tcp_udp_session.pcapng"
    sessions, bursts, stats, events = sessions_of([pcapng], names=["capture"])
    assert stats.packets_read == stats.packets_used == 13
    assert summary(sessions) == BASE_SUMMARY

    # The same records stored as classic pcap must give identical events.
    records = list(iter_records(pcapng))
    classic = tmp_path / "tcp_udp_session.pcap"
    classic.write_bytes(pcap_bytes([(r.ts_ns, r.data) for r in records], nanosecond=True))
    assert sessions_of([classic], names=["capture"])[3] == events
    # The big-endian pcap of hard case 06 contains the same exchange. Only IP IDs and checksums differ.
    big_endian = hard_cases / "06-big-endian-captures" / "bigendian_usec.pcap"
    assert policy_bytes(big_endian, "anonymize") == policy_bytes(pcapng, "anonymize")


def test_05_empty_captures(hard_cases):
    for path in sorted((hard_cases / "05-empty-captures").glob("*.pcap*")):
        sessions, bursts, stats, events = sessions_of([path])
        assert events == [], path.name
        assert stats.packets_read == 0, path.name


def test_06_big_endian_captures(hard_cases):
    folder = hard_cases / "06-big-endian-captures"
    for name, last_ts in (("bigendian_usec.pcap", 1_700_000_000_120_000_000),
                          ("bigendian_nsec.pcap", 1_700_000_000_119_999_886)):
        records = list(iter_records(folder / name))
        assert len(records) == 13, name
        assert records[0].ts_ns == 1_700_000_000_000_000_000, name
        assert records[-1].ts_ns == last_ts, name
        sessions = sessions_of([folder / name])[0]
        assert [(s.name, s.total_packets) for s in sessions] == [(BASE_TCP, 11), (BASE_UDP, 2)], name

    records = list(iter_records(folder / "bigendian_dhcp.pcapng"))
    assert len(records) == 4
    assert {r.ts_ns for r in records} == {0}
    sessions = sessions_of([folder / "bigendian_dhcp.pcapng"])[0]
    assert len(sessions) == 2
    assert {s.proto for s in sessions} == {17}
    assert sum(s.total_packets for s in sessions) == 4


def test_08_truncated_last_record(hard_cases, caplog):
    for path in sorted((hard_cases / "08-truncated-last-record").glob("*.pcap*")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            sessions, _, stats, _ = sessions_of([path], names=[path.name])
        assert stats.packets_used == 12, path.name
        assert stats.packets_skipped == {"truncated_record": 1}, path.name
        assert summary(sessions) == [(BASE_TCP, [6, 5], [77, 2000]), (BASE_UDP, [1, 0], [33, 0])], path.name
        warnings = [m for m in caplog.messages if "truncated_record" in m]
        assert len(warnings) == 1, path.name
        assert path.name in warnings[0], path.name
        if path.suffix == ".pcap":
            assert "byte offset 2962" in warnings[0], path.name


def test_09_snaplen_truncated_tcp(hard_cases):
    path = hard_cases / "09-snaplen-truncated-tcp" / "snaplen96.pcap"
    records = list(iter_records(path))
    assert [r.wire_len for r in records] == [54, 54, 54, 131, 54, 1254, 854, 54, 54, 54, 54, 75, 106]
    packets = list(iter_packets(path, path.name, SkipCounter()))
    assert len(packets) == 13
    captured_payload = [p.end - p.payload_offset for _, p in packets]
    for frame_number in (4, 6, 7):
        assert captured_payload[frame_number - 1] == 42
        assert packets[frame_number - 1][1].truncated
    assert captured_payload[12] == 54
    assert packets[12][1].wire_payload_len == 64
    for record, packet in packets:
        for policy in ("anonymize", "strip-link", "raw", "etbert"):
            assert len(apply_header_policy(policy, record.data, packet, (0, 0))) <= len(record.data)
    sessions = sessions_of([path])[0]
    assert summary(sessions) == BASE_SUMMARY


def test_12_linux_sll2_same_ip_bytes(hard_cases):
    sll2 = hard_cases / "12-linux-sll2" / "sll2_any_interface.pcap"
    ethernet = hard_cases / "01-pcapng-tcp-session" / "tcp_udp_session.pcapng"
    assert {r.linktype for r in iter_records(sll2)} == {276}
    assert ip_bytes_without_id(sll2) == ip_bytes_without_id(ethernet)
    assert summary(sessions_of([sll2])[0]) == BASE_SUMMARY


def test_15_vlan_tags_not_in_key_or_tokens(hard_cases):
    folder = hard_cases / "15-vlan-8021q-qinq"
    one_way = folder / "vlan_one_direction_tagged.pcap"
    sessions, _, stats, _ = sessions_of([one_way])
    assert summary(sessions) == BASE_SUMMARY
    base = hard_cases / "01-pcapng-tcp-session" / "tcp_udp_session.pcapng"
    assert ip_bytes_without_id(one_way) == ip_bytes_without_id(base)

    sessions, _, _, _ = sessions_of([folder / "qinq_88a8_8100_9100.pcap"])
    assert [(s.proto, s.total_packets) for s in sessions] == [(6, 11)]
    for record, packet in iter_packets(folder / "qinq_88a8_8100_9100.pcap", "qinq", SkipCounter()):
        assert packet.ip_offset == 22
        assert apply_header_policy("anonymize", record.data, packet)[0] >> 4 == 4

    sessions, _, stats, _ = sessions_of([folder / "802.1ad_QinQ.pcap"])
    assert sessions == []
    assert stats.packets_skipped == {"non_ip": 2}


def test_22_flow_split_across_files(hard_cases):
    folder = hard_cases / "22-flow-split-across-files"
    first, second = folder / "capture_00001.pcap", folder / "capture_00002.pcap"
    expected_name = "tcp 192.0.2.10:51500>198.51.100.20:80"

    together = {}
    for order in ((first, second), (second, first)):
        sessions, bursts, _, _ = sessions_of(order, names=[p.name for p in order])
        assert [(s.name, s.packets) for s in sessions] == [(expected_name, [6, 5])]
        assert sessions[0].sources == ["capture_00001.pcap", "capture_00002.pcap"]
        together[order[0].name] = [(b.direction, len(b.packets), b.source) for b in bursts]
    assert together["capture_00001.pcap"] == together["capture_00002.pcap"]
    runs = together["capture_00001.pcap"]
    assert (1, 3, "capture_00001.pcap") in runs  # the server run that spans both files is one BURST
    assert sum(n for _, n, _ in runs) == 11

    alone = {}
    for path in (first, second):
        sessions, bursts, _, events = sessions_of([path], names=[path.name])
        assert [s.name for s in sessions] == [expected_name], path.name
        assert sessions[0].sources == [path.name]
        assert all(e.source == path.name for e in events if isinstance(e, Burst))
        alone[path.name] = summary(sessions)
    # Each file alone gives the same result whichever is read first.
    assert summary(sessions_of([second])[0]) == alone["capture_00002.pcap"]
    assert alone["capture_00001.pcap"][0][1][0] + alone["capture_00002.pcap"][0][1][0] == 6


def test_23_zero_payload_flows(hard_cases, tmp_path):
    path = hard_cases / "23-zero-payload-flows" / "zero_payload_mix.pcap"
    sessions, bursts, stats, events = sessions_of([path])
    assert [s.total_packets for s in sessions] == [6, 2, 2, 11]
    assert [s.payload_bytes for s in sessions][:3] == [[0, 0]] * 3
    assert sessions[3].payload_bytes == [77, 2000]
    # Packets without payload are kept and tokenized with their headers, so no BURST is empty.
    assert all(len(p) > 0 for b in bursts for p in b.packets)
    assert all(s.first_packets and all(s.first_packets) for s in sessions)

    # The normal session alone gives the same BURSTs and kept bytes.
    normal = sessions[3]
    records = [r for r, p in iter_packets(path, path.name, SkipCounter()) if p.sport == 52003 or p.dport == 52003]
    alone_path = tmp_path / "alone.pcap"
    alone_path.write_bytes(pcap_bytes([(r.ts_ns, r.data) for r in records], nanosecond=True))
    alone_sessions, alone_bursts, _, _ = sessions_of([alone_path])
    assert summary(alone_sessions) == summary([normal])
    assert alone_sessions[0].first_packets == normal.first_packets
    assert [b.packets for b in alone_bursts] == [b.packets for b in bursts if b.session_index == normal.index]


def test_26_corrupt_ip_headers(hard_cases, caplog):
    folder = hard_cases / "26-corrupt-ip-headers"
    path = folder / "corrupt_headers_interleaved.pcap"
    with caplog.at_level(logging.WARNING):
        sessions, bursts, stats, _ = sessions_of([path], names=[path.name])
    assert summary(sessions) == [("tcp 192.0.2.10:53500>198.51.100.20:80", [6, 5], [77, 2000])]
    assert stats.packets_read == 21
    assert stats.packets_used == 11
    assert stats.total_skipped == 10
    # Each damaged packet (the even-numbered frames) is named in its own warning.
    named = {int(m) for m in re.findall(r"corrupt_headers_interleaved\.pcap: packet (\d+) ", caplog.text)}
    assert named == {1, 3, 5, 7, 9, 11, 13, 15, 17, 19}
    assert set(stats.packets_skipped) <= {
        "bad_ip_header", "bad_ip_length", "bad_tcp_header", "bad_udp_length", "truncated_ip_header",
        "truncated_link_header",
    }

    for name, reason in (("ipv4_invalid_hdr_length.pcap", "bad_ip_header"),
                         ("ipv4_invalid_total_length.pcap", "bad_ip_length")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            sessions, _, stats, _ = sessions_of([folder / name], names=[name])
        assert sessions == [], name
        assert stats.packets_skipped == {reason: 1}, name
        assert f"{name}: packet 0" in caplog.text


def test_hard_cases_balanced_under_every_policy(hard_cases):
    paths = sorted(hard_cases.rglob("*.pcap*"))
    for policy in ("anonymize", "strip-link", "raw", "etbert"):
        for path in paths:
            stats = SkipCounter(warn_limit=0)
            events = list(iter_sessions([path], SessionOptions(), policy, stats=stats))
            assert stats.is_balanced(), (policy, path.name)
            ends = [e for e in events if isinstance(e, SessionEnd)]
            assert sum(e.session.total_packets for e in ends) == stats.packets_used, (policy, path.name)
