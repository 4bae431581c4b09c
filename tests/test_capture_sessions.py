"""Tests for etbert_jax.capture.sessions: keys, client rule, timeouts, FIN/RST, BURSTs and kept bytes."""

from __future__ import annotations

import pytest

from capture_frames import pcap_bytes, tcp_frame, udp_frame
from etbert_jax.capture.decode import ACK, FIN, RST, SYN, decode_packet
from etbert_jax.capture.options import SessionOptions
from etbert_jax.capture.sessions import (
    Burst,
    PacketBytes,
    SessionEnd,
    SessionTable,
    collect_sessions,
    format_endpoint,
    iter_sessions,
)
from etbert_jax.capture.stats import SkipCounter

SECOND = 1_000_000_000
C, S = "192.0.2.10", "198.51.100.20"
PSH_ACK = 0x18


def run(frames, options=SessionOptions(), **table_args):
    """Feed (ts_ns, frame) pairs through a table; return (sessions, bursts, all events)."""
    table = SessionTable(options, **table_args)
    events = []
    for index, (ts_ns, frame) in enumerate(frames):
        packet = decode_packet(1, frame, len(frame))
        assert not isinstance(packet, str), packet
        events.extend(table.add(ts_ns, packet, frame, "synthetic.pcap", index))
    events.extend(table.close_all())
    sessions, bursts = collect_sessions(events)
    return sessions, bursts, events


def handshake_and_data(sport=50000, t0=0, isn_c=1000, isn_s=9000):
    """A full TCP connection: handshake, 2 client segments, 3 server segments, FIN/FIN/ACK."""
    t = t0
    frames = []

    def add(src, dst, a, b, flags, seq, ack, payload=b""):
        nonlocal t
        t += SECOND // 100
        frames.append((t, tcp_frame(src, dst, a, b, flags, seq, ack, payload)))

    add(C, S, sport, 443, SYN, isn_c, 0)
    add(S, C, 443, sport, SYN | ACK, isn_s, isn_c + 1)
    add(C, S, sport, 443, ACK, isn_c + 1, isn_s + 1)
    add(C, S, sport, 443, PSH_ACK, isn_c + 1, isn_s + 1, b"a" * 10)
    add(C, S, sport, 443, PSH_ACK, isn_c + 11, isn_s + 1, b"b" * 10)
    for i in range(3):
        add(S, C, 443, sport, PSH_ACK, isn_s + 1 + 100 * i, isn_c + 21, b"s" * 100)
    add(C, S, sport, 443, FIN | ACK, isn_c + 21, isn_s + 301)
    add(S, C, 443, sport, FIN | ACK, isn_s + 301, isn_c + 22)
    add(C, S, sport, 443, ACK, isn_c + 22, isn_s + 302)
    return frames


def test_session_key_is_bidirectional_and_client_is_syn_sender():
    sessions, bursts, _ = run(handshake_and_data())
    assert len(sessions) == 1
    session = sessions[0]
    assert session.client_str == f"{C}:50000"
    assert session.server_str == f"{S}:443"
    assert session.name == f"tcp {C}:50000>{S}:443"
    assert session.packets == [6, 5]
    assert session.payload_bytes == [20, 300]
    assert [(b.direction, len(b.packets)) for b in bursts] == [(0, 1), (1, 1), (0, 3), (1, 3), (0, 1), (1, 1), (0, 1)]
    assert session.bursts == len(bursts)
    assert session.sources == ["synthetic.pcap"]


def test_syn_ack_first_makes_sender_server():
    frames = handshake_and_data()[1:]
    sessions, _, _ = run(frames)
    assert sessions[0].client_str == f"{C}:50000"


@pytest.mark.parametrize(
    "sport, dport, expected_client",
    [
        (443, 50000, f"{C}:50000"),  # server speaks first; the low port marks it
        (50000, 443, f"{S}:50000"),  # the sender talks to a low port, so it is the client
        (40000, 50000, f"{S}:40000"),  # no low port: the first sender is the client
        (22, 443, f"{S}:22"),  # two low ports: the first sender is the client
    ],
)
def test_mid_stream_client_rule(sport, dport, expected_client):
    frames = [
        (1, tcp_frame(S, C, sport, dport, PSH_ACK, 5, 5, b"x")),
        (2, tcp_frame(C, S, dport, sport, ACK, 5, 6)),
    ]
    sessions, _, _ = run(frames)
    assert len(sessions) == 1
    assert sessions[0].client_str == expected_client


def test_udp_first_sender_is_client():
    frames = [(1, udp_frame(S, C, 53, 40000, b"resp")), (2, udp_frame(C, S, 40000, 53, b"q"))]
    sessions, _, _ = run(frames)
    assert sessions[0].client_str == f"{S}:53"
    assert sessions[0].packets == [1, 1]


def test_port_reuse_after_fin_starts_new_session():
    frames = handshake_and_data() + handshake_and_data(t0=SECOND, isn_c=77, isn_s=88)
    sessions, _, _ = run(frames)
    assert [s.total_packets for s in sessions] == [11, 11]
    assert [s.end_reason for s in sessions] == ["new_syn", "end_of_input"]
    merged, _, _ = run(frames, SessionOptions.conversations())
    assert [s.total_packets for s in merged] == [22]


def test_rst_closes_and_late_packets_stay():
    frames = [
        (1, tcp_frame(C, S, 50001, 23, SYN, 1, 0)),
        (2, tcp_frame(S, C, 23, 50001, RST | ACK, 0, 2)),
        (3, tcp_frame(C, S, 50001, 23, ACK, 2, 1)),  # late packet: same session
        (4, tcp_frame(C, S, 50001, 23, SYN, 500, 0)),  # new connection
    ]
    sessions, _, _ = run(frames)
    assert [s.total_packets for s in sessions] == [3, 1]


def test_closing_grace_ends_session():
    frames = handshake_and_data()
    late = (frames[-1][0] + 10 * SECOND, tcp_frame(C, S, 50000, 443, ACK, 1022, 9302))
    sessions, _, _ = run(frames + [late], SessionOptions(closing_grace_s=5))
    assert [s.total_packets for s in sessions] == [11, 1]
    assert sessions[0].end_reason == "closed"


def test_fin_rst_split_off_keeps_one_session():
    frames = handshake_and_data()
    late = (frames[-1][0] + 10 * SECOND, tcp_frame(C, S, 50000, 443, ACK, 1022, 9302))
    sessions, _, _ = run(frames + [late], SessionOptions(split_on_fin_rst=False))
    assert [s.total_packets for s in sessions] == [12]


def test_idle_and_active_timeouts():
    frames = [(i * 50 * SECOND, udp_frame(C, S, 40000, 53, b"q")) for i in range(4)]
    idle = SessionOptions(idle_timeout_s=40, active_timeout_s=None)
    assert [s.total_packets for s in run(frames, idle)[0]] == [1, 1, 1, 1]
    assert [s.end_reason for s in run(frames, idle)[0]] == ["idle"] * 3 + ["end_of_input"]
    active = SessionOptions(idle_timeout_s=None, active_timeout_s=120)
    assert [s.total_packets for s in run(frames, active)[0]] == [3, 1]
    assert [s.total_packets for s in run(frames, SessionOptions.conversations())[0]] == [4]


def test_sweep_bounds_live_sessions():
    options = SessionOptions(idle_timeout_s=1, sweep_every_packets=10)
    table = SessionTable(options)
    ended = 0
    peak = 0
    for i in range(200):
        frame = udp_frame(C, S, 10000 + i, 53, b"q")
        events = table.add(i * SECOND, decode_packet(1, frame, len(frame)), frame)
        ended += sum(isinstance(e, SessionEnd) for e in events)
        peak = max(peak, len(table))
    assert peak <= 11
    assert ended >= 180
    ended += sum(isinstance(e, SessionEnd) for e in table.close_all())
    assert ended == 200


def test_kept_bytes_and_packet_events():
    frames = handshake_and_data()
    _, bursts, events = run(
        frames, keep_bytes_burst=30, keep_packets_flow=3, keep_bytes_flow=50,
        emit_packets=True, keep_bytes_packet=45, max_packets_per_session=4,
    )
    session = next(e.session for e in events if isinstance(e, SessionEnd))
    assert len(session.first_packets) == 3
    assert all(len(p) <= 50 for p in session.first_packets)
    assert [i.direction for i in session.first_packet_info] == [0, 1, 0]
    assert [i.index for i in session.first_packet_info] == [0, 1, 2]
    assert all(len(p) <= 30 for b in bursts for p in b.packets)
    assert sum(len(b.packets) for b in bursts) == 11
    packets = [e for e in events if isinstance(e, PacketBytes)]
    assert [p.number for p in packets] == [0, 1, 2, 3]
    assert all(len(p.data) <= 45 for p in packets)
    assert packets[0].session_name == session.name
    # A session's end comes after all of its BURSTs.
    last_burst = max(i for i, e in enumerate(events) if isinstance(e, Burst))
    end = next(i for i, e in enumerate(events) if isinstance(e, SessionEnd))
    assert end > last_burst


def test_bursts_disabled():
    _, bursts, events = run(handshake_and_data(), keep_bytes_burst=0)
    assert bursts == []
    assert any(isinstance(e, SessionEnd) for e in events)


def test_same_input_same_events():
    frames = handshake_and_data() + [(5, udp_frame(C, S, 40000, 53, b"q"))] + handshake_and_data(50001)
    frames.sort(key=lambda item: item[0])
    first = run(frames)[2]
    second = run(frames)[2]
    assert first == second
    sessions = run(frames)[0]
    assert [s.index for s in sessions] == list(range(len(sessions)))
    assert sessions == sorted(sessions, key=lambda s: s.first_ts_ns)


def test_ipv6_endpoint_format():
    assert format_endpoint((bytes.fromhex("20010db8" + "00" * 11 + "01"), 443)) == "[2001:db8::1]:443"


def test_invalid_table_arguments():
    with pytest.raises(ValueError, match="keep_bytes_burst"):
        SessionTable(keep_bytes_burst=-1)
    with pytest.raises(ValueError, match="header_policy"):
        SessionTable(header_policy="none")
    with pytest.raises(ValueError, match="idle_timeout_s"):
        SessionOptions(idle_timeout_s=-1)


def test_iter_sessions_reports_bad_files(tmp_path):
    good = tmp_path / "good.pcap"
    good.write_bytes(pcap_bytes(handshake_and_data()))
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"<html></html>")
    failures = []
    stats = SkipCounter()
    events = list(iter_sessions([bad, good], stats=stats, on_format_error=lambda name, err: failures.append(name)))
    sessions, _ = collect_sessions(events)
    assert [s.total_packets for s in sessions] == [11]
    assert failures == [str(bad)]
    assert stats.packets_used == 11


def test_series_reports_unreadable_file(tmp_path):
    first = tmp_path / "d_1.pcap"
    first.write_bytes(pcap_bytes(handshake_and_data()))
    dangling = tmp_path / "d_2.pcap"
    dangling.symlink_to(tmp_path / "missing.pcap")
    failures = []
    stats = SkipCounter()

    events = list(iter_sessions([first, dangling], stats=stats,
                                on_format_error=lambda name, err: failures.append((name, err.reason))))

    sessions, _ = collect_sessions(events)
    assert [s.total_packets for s in sessions] == [11]
    assert [name for name, _ in failures] == [str(dangling)]
    assert "cannot read" in failures[0][1]
    assert stats.packets_used == 11


def _events_in_batches(path, max_records, **table_args):
    """Run one capture through a table in batches of `max_records` records; return normalized events."""
    from etbert_jax.capture.decode import iter_packet_batches

    table = SessionTable(SessionOptions(), "anonymize", **table_args)
    events = []
    for batch in iter_packet_batches(path, stats=SkipCounter(warn_limit=0), max_records=max_records):
        events.extend(table.add_batch(batch, "capture"))
    events.extend(table.close_all())
    return [(type(event).__name__, tuple(event) if isinstance(event, tuple) else
             (event.session.index, event.session.packets, event.session.first_packets, event.session.end_reason))
            for event in events]


@pytest.mark.parametrize("name", ["tls13/arkime-curl-tls13.pcap", "quic/zeek-quic-doq.pcap",
                                  "ssh/zeek-ssh-kex-mlkem-bulk.pcap"])
def test_batch_size_does_not_change_events(sample_captures, name):
    # BURSTs and first packets span batch boundaries; their bytes are filled in when each batch ends.
    path = sample_captures / name
    table_args = dict(keep_bytes_burst=64, keep_packets_flow=5, keep_bytes_flow=129, emit_packets=True,
                      keep_bytes_packet=129)
    whole = _events_in_batches(path, 4096, **table_args)
    assert len(whole) > 10
    assert _events_in_batches(path, 7, **table_args) == whole
    assert _events_in_batches(path, 1, **table_args) == whole


def test_single_packet_add_matches_batches(sample_captures):
    from etbert_jax.capture.decode import iter_packets

    path = sample_captures / "tls13" / "arkime-curl-tls13.pcap"
    table = SessionTable(SessionOptions(), "anonymize", keep_bytes_burst=64, emit_packets=True)
    one_by_one = []
    for record, packet in iter_packets(path, stats=SkipCounter(warn_limit=0)):
        one_by_one.extend(table.add(record.ts_ns, packet, record.data, "capture", record.index))
    one_by_one.extend(table.close_all())

    batched = list(iter_sessions([path], names=["capture"], keep_bytes_burst=64, emit_packets=True,
                                 stats=SkipCounter(warn_limit=0)))
    assert [type(event) for event in one_by_one] == [type(event) for event in batched]
    for mine, theirs in zip(one_by_one, batched):
        if isinstance(mine, SessionEnd):
            assert mine.session.packets == theirs.session.packets
        else:
            assert mine == theirs
