"""Tests for etbert_jax.capture.reader: formats, byte orders, timestamps, damaged and invalid files."""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import zlib

import dpkt
import pytest

from capture_frames import (
    gzip_bytes,
    pcap_bytes,
    pcap_record,
    pcapng_block,
    pcapng_epb,
    pcapng_interface,
    pcapng_section,
    pcapng_spb,
    udp_frame,
)
from etbert_jax.capture import reader as reader_module
from etbert_jax.capture.decode import iter_packets
from etbert_jax.capture.headers import apply_header_policy
from etbert_jax.capture.reader import (
    MAX_RECORD_BYTES,
    CaptureFormatError,
    iter_record_batches,
    iter_records,
)
from etbert_jax.capture.sessions import SessionTable
from etbert_jax.capture.stats import SkipCounter


def read_all(source, stats=None):
    return list(iter_records(source, name="capture", stats=stats or SkipCounter()))


def manifest_rows(root):
    with open(root / "MANIFEST.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_corpus_packet_counts_match_manifest(shared_pcaps):
    for row in manifest_rows(shared_pcaps):
        stats = SkipCounter()
        records = read_all(shared_pcaps / row["path"], stats)
        assert len(records) == int(row["packets"]), row["path"]
        assert stats.packets_read == len(records) + stats.total_skipped, row["path"]
        assert all(len(r.data) <= MAX_RECORD_BYTES for r in records), row["path"]
        assert [r.index for r in records] == sorted(r.index for r in records), row["path"]


def test_format_detected_by_magic_not_name(shared_pcaps):
    path = shared_pcaps / "ssh" / "ndpi-ssh.pcap"
    assert path.read_bytes()[:4] == bytes.fromhex("0a0d0d0a")
    records = read_all(path)
    assert len(records) == 295
    assert {r.linktype for r in records} == {1}


def test_pcap_byte_orders_and_resolutions_agree(tmp_path):
    frames = [(1_700_000_000_123_456_789, udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, b"x" * n)) for n in (1, 9)]
    results = {}
    for order in "<>":
        for nanosecond in (False, True):
            path = tmp_path / f"{order == '<'}-{nanosecond}.pcap"
            path.write_bytes(pcap_bytes(frames, order=order, nanosecond=nanosecond))
            results[(order, nanosecond)] = read_all(path)
    for (order, nanosecond), records in results.items():
        assert [r.data for r in records] == [f for _, f in frames]
        expected_ts = 1_700_000_000_123_456_789 if nanosecond else 1_700_000_000_123_456_000
        assert [r.ts_ns for r in records] == [expected_ts, expected_ts]
        assert all(isinstance(r.ts_ns, int) for r in records)


def test_pcap_nanosecond_corpus_file(shared_pcaps):
    records = read_all(shared_pcaps / "edge-pcap-nanosecond" / "tcpdump-tcp-handshake-nano-sll.pcap")
    # frame.time_epoch of the three frames as tshark 4.0 prints them.
    assert [r.ts_ns for r in records] == [1418145369924505488, 1418145370052027262, 1418145370052115157]
    assert {r.linktype for r in records} == {113}


def test_pcap_big_endian_corpus_file(shared_pcaps):
    path = shared_pcaps / "edge-pcap-bigendian" / "tcpdump-pptp-bigendian.pcap"
    assert path.read_bytes()[:4] == bytes.fromhex("a1b2c3d4")
    records = read_all(path)
    assert len(records) == 23
    assert all(r.wire_len >= len(r.data) > 14 for r in records)


def test_pcapng_big_endian_reads_simple_packet_blocks(shared_pcaps):
    records = read_all(shared_pcaps / "edge-pcapng-bigendian" / "hadrielk-pcapng-be-advanced.pcapng")
    assert len(records) == 5
    assert {r.linktype for r in records} == {0, 1}


def test_pcapng_multi_section_file(shared_pcaps):
    records = read_all(shared_pcaps / "edge-pcapng-multi-interface" / "hadrielk-pcapng-le-multi-section.pcapng")
    assert len(records) == 8
    assert {r.linktype for r in records} == {0, 1}
    assert [r.index for r in records] == list(range(8))


def test_pcapng_interfaces_with_different_tsresol(shared_pcaps):
    records = read_all(shared_pcaps / "edge-pcapng-multi-interface" / "zeek-pcapng-multi-interface.pcapng")
    assert len(records) == 6
    seconds = [r.ts_ns // 1_000_000_000 for r in records]
    # Both interfaces must land in the same hour once their resolutions are applied.
    assert max(seconds) - min(seconds) < 3600
    assert min(seconds) > 1_000_000_000


def test_pcapng_synthetic_sections_resolutions_and_spb(tmp_path):
    frame = udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, b"payload")
    data = (
        pcapng_section("<")
        + pcapng_interface(1, snaplen=0)  # default 10^-6 s units
        + pcapng_interface(1, tsresol=9, tsoffset=100)  # ns units, offset 100 s
        + pcapng_epb(0, 5_000_000, frame)
        + pcapng_block(4, b"\0" * 12)  # name resolution block: skipped
        + pcapng_epb(1, 7, frame)
        + pcapng_spb(frame)
        + pcapng_section(">")
        + pcapng_interface(1, snaplen=20, tsresol=0x80 | 10, order=">")  # 2^-10 s units
        + pcapng_epb(0, 1024, frame, order=">")
        + pcapng_spb(frame, order=">")
    )
    path = tmp_path / "mixed.pcapng"
    path.write_bytes(data)
    stats = SkipCounter()
    records = read_all(path, stats)
    assert [r.ts_ns for r in records] == [5_000_000_000, 100_000_000_007, 100_000_000_007, 1_000_000_000, 1_000_000_000]
    assert [len(r.data) for r in records] == [len(frame)] * 4 + [20]
    assert records[-1].wire_len == len(frame)
    assert stats.packets_read == 5
    assert not stats.packets_skipped


def test_gzip_capture_read_transparently(shared_pcaps, tmp_path):
    records = read_all(shared_pcaps / "edge-gzip" / "zeek-tls-fragmented-handshake.pcap.gz")
    assert len(records) == 416

    frames = [(i * 1000, udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, bytes([i]))) for i in range(3)]
    packed = gzip_bytes(pcap_bytes(frames))

    class OneWay(io.RawIOBase):
        """A non-seekable stream."""

        def __init__(self, data):
            self._inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = self._inner.read(min(len(buffer), 7))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    streamed = read_all(io.BufferedReader(OneWay(packed)))
    assert [r.data for r in streamed] == [f for _, f in frames]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>not found</body></html>", "unknown magic"),
        (bytes.fromhex("d4c3b2a1") + b"\x02\x00\x04\x00", "truncated pcap global header"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x00\x00\x00\x00" + bytes(16), "byte-order magic"),
        (b"ab", "only 2 bytes"),
        (gzip_bytes(b"hello, this is text and not a capture"), "unknown magic"),
        (gzip_bytes(b"x"), "does not contain a capture"),
        (b"\x1f\x8b\x08\x00garbage-not-deflate", "gzip"),
    ],
)
def test_unreadable_files_raise_format_error(tmp_path, content, reason):
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    with pytest.raises(CaptureFormatError, match=reason):
        read_all(path)


def test_empty_captures_give_no_records(hard_cases):
    for path in sorted((hard_cases / "05-empty-captures").glob("*.pcap*")):
        stats = SkipCounter()
        assert read_all(path, stats) == [], path.name
        assert stats.packets_read == 0, path.name


@pytest.mark.parametrize("caplen", [MAX_RECORD_BYTES + 1, 0xFFFFFFFF])
def test_absurd_pcap_length_stops_reading(tmp_path, caplog, caplen):
    good = udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, b"ok")
    data = pcap_bytes([(0, good)], snaplen=MAX_RECORD_BYTES)
    bad_offset = len(data)
    data += pcap_record(1, caplen, caplen, b"") + pcap_record(2, len(good), len(good), good)
    path = tmp_path / "absurd.pcap"
    path.write_bytes(data)
    stats = SkipCounter()
    with caplog.at_level(logging.WARNING):
        records = read_all(path, stats)
    assert [r.data for r in records] == [good]
    assert stats.packets_skipped == {"absurd_record_length": 1}
    assert f"byte offset {bad_offset}" in caplog.text


def test_record_above_snaplen_is_absurd(tmp_path):
    data = pcap_bytes([], snaplen=96) + pcap_record(0, 96 + 50_000, 96 + 50_000, bytes(96 + 50_000))
    path = tmp_path / "snap.pcap"
    path.write_bytes(data)
    stats = SkipCounter()
    assert read_all(path, stats) == []
    assert stats.packets_skipped == {"absurd_record_length": 1}


@pytest.mark.parametrize("length", [13, 8, 64 * 1024 * 1024])
def test_bad_pcapng_block_length_stops_reading(tmp_path, caplog, length):
    frame = udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, b"ok")
    head = pcapng_section() + pcapng_interface() + pcapng_epb(0, 1, frame)
    bad = bytes.fromhex("06000000") + length.to_bytes(4, "little") + bytes(32)
    path = tmp_path / "badblock.pcapng"
    path.write_bytes(head + bad + pcapng_epb(0, 2, frame))
    stats = SkipCounter()
    with caplog.at_level(logging.WARNING):
        records = read_all(path, stats)
    assert len(records) == 1
    assert stats.total_skipped == 1
    assert set(stats.packets_skipped) <= {"bad_block_length", "absurd_record_length"}
    assert f"byte offset {len(head)}" in caplog.text


def test_pcapng_unknown_interface_is_skipped_and_reading_continues(tmp_path):
    frame = udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, b"ok")
    path = tmp_path / "iface.pcapng"
    path.write_bytes(pcapng_section() + pcapng_interface() + pcapng_epb(3, 1, frame) + pcapng_epb(0, 2, frame))
    stats = SkipCounter()
    records = read_all(path, stats)
    assert [r.index for r in records] == [1]
    assert stats.packets_skipped == {"unknown_interface": 1}


def test_truncated_last_record_offsets(hard_cases, caplog):
    folder = hard_cases / "08-truncated-last-record"
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".pcap", ".pcapng"):
            continue
        stats = SkipCounter()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            records = list(iter_records(path, path.name, stats))
        assert len(records) == 12, path.name
        assert stats.packets_skipped == {"truncated_record": 1}, path.name
        assert stats.packets_read == 13, path.name
        warning = [m for m in caplog.messages if "truncated_record" in m]
        assert len(warning) == 1, path.name
        assert path.name in warning[0]
        if path.suffix == ".pcap":
            assert "byte offset 2962" in warning[0], path.name
        # Every record yielded is complete: captured length equals the wire length in this file.
        assert all(len(r.data) == r.wire_len for r in records), path.name


def test_truncated_pcapng_warning_names_block_offset(hard_cases, caplog):
    path = hard_cases / "08-truncated-last-record" / "cut_pcapng_last_block.pcapng"
    size = path.stat().st_size
    with caplog.at_level(logging.WARNING):
        records = list(iter_records(path, path.name, SkipCounter()))
    message = next(m for m in caplog.messages if "truncated_record" in m)
    offset = int(message.split("byte offset ")[1].split()[0])
    assert records[-1].offset < offset < size


def test_file_object_and_path_agree(hard_cases):
    path = hard_cases / "01-pcapng-tcp-session" / "tcp_udp_session.pcapng"
    from_path = read_all(path)
    with open(path, "rb") as handle:
        from_handle = read_all(handle)
    assert from_path == from_handle
    assert len(from_path) == 13


def test_corrupted_files_never_crash(hard_cases, shared_pcaps):
    """Random byte damage and cuts give counted skips or CaptureFormatError, never another exception."""
    originals = [
        hard_cases / "01-pcapng-tcp-session" / "tcp_udp_session.pcapng",
        shared_pcaps / "edge-pcapng-multi-interface" / "hadrielk-pcapng-le-multi-section.pcapng",
        shared_pcaps / "edge-nflog" / "zeek-nflog-http.pcap",
        shared_pcaps / "edge-ipv6-ext-headers" / "zeek-ipv6-mobility-dst-opts.pcap",
        shared_pcaps / "edge-linux-sll2" / "zeek-linux-dlt-sll2.pcap",
    ]
    rng = random.Random(7)
    format_errors = 0
    for path in originals:
        original = path.read_bytes()
        for trial in range(40):
            data = bytearray(original[: rng.randrange(len(original))] if trial % 3 == 0 else original)
            for _ in range(rng.randrange(1, 20)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            if trial % 4 == 1:
                # A cut gzip stream: damage inside the compressed data.
                packed = gzip_bytes(bytes(data))
                data = bytearray(packed[: rng.randrange(10, len(packed))])
            stats = SkipCounter(warn_limit=0)
            table = SessionTable(emit_packets=True)
            try:
                for record, packet in iter_packets(io.BytesIO(bytes(data)), "damaged", stats):
                    for policy in ("anonymize", "strip-link", "raw", "etbert"):
                        assert len(apply_header_policy(policy, record.data, packet, (1, 2))) <= len(record.data)
                    table.add(record.ts_ns, packet, record.data)
            except CaptureFormatError:
                format_errors += 1
                continue
            table.close_all()
            assert stats.is_balanced(), (path.name, trial)
    assert format_errors < len(originals) * 40


def test_reading_is_streamed(shared_pcaps):
    """The reader pulls bytes batch by batch as records are consumed instead of loading the file first."""
    path = shared_pcaps / "app-alexa" / "ndpi-alexa-app.pcapng"
    size = path.stat().st_size

    class CountingReader(io.RawIOBase):
        def __init__(self, inner):
            self.inner = inner
            self.consumed = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            data = self.inner.read(len(buffer))
            buffer[: len(data)] = data
            self.consumed += len(data)
            return len(data)

    with open(path, "rb") as handle:
        counter = CountingReader(handle)
        batches = iter_record_batches(io.BufferedReader(counter), "alexa", max_records=10)
        assert len(next(batches)) == 10
        # At most one read-ahead block (plus the stream's own buffer), not the whole file.
        assert counter.consumed <= reader_module._BLOCK + 64 * 1024
        assert size > counter.consumed + 100_000
        remaining = sum(len(batch) for batch in batches)
    assert remaining + 10 == 3103
    assert counter.consumed == size


def test_compiled_framing_matches_dpkt(sample_captures):
    # Compiled loops frame classic pcap and pcapng enhanced packet blocks, and dpkt reads the same
    # records on its own. dpkt reports pcapng timestamps in microseconds, so they are compared there.
    paths = sorted(path for path in sample_captures.rglob("*") if path.suffix in (".pcap", ".pcapng"))
    pcapng = 0
    for path in paths:
        with open(path, "rb") as handle:
            magic = handle.read(4)
            handle.seek(0)
            reference = dpkt.pcapng.Reader(handle) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(handle)
            expected = [(round(ts * 1e6), bytes(frame)) for ts, frame in reference]
        pcapng += magic == b"\x0a\x0d\x0d\x0a"

        for max_records in (4096, 3):
            records = []
            for batch in iter_record_batches(path, stats=SkipCounter(warn_limit=0), max_records=max_records):
                assert len(batch) <= max_records
                records.extend(batch.record(row) for row in range(len(batch)))
            assert [record.data for record in records] == [frame for _, frame in expected], path
            assert [record.index for record in records] == list(range(len(records)))
            assert [round(record.ts_ns / 1000) for record in records] == [ts for ts, _ in expected], path
    assert pcapng >= 3


@pytest.mark.parametrize("offset_s", [(1 << 63) - 1, -(1 << 63), 9_000_000_000])
def test_huge_time_offset_clamped(tmp_path, offset_s):
    # Timestamps past int64 nanoseconds are clamped on the compiled path as on the Python path.
    frames = [udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, bytes([i])) for i in range(4)]
    blocks = [pcapng_epb(0, 10**9 * (i + 1), frame) for i, frame in enumerate(frames)]
    path = tmp_path / "offset.pcapng"
    path.write_bytes(pcapng_section() + pcapng_interface(tsresol=9, tsoffset=offset_s) + b"".join(blocks))
    stats = SkipCounter()

    records = read_all(path, stats)

    assert [r.data for r in records] == frames
    exact = [offset_s * 10**9 + 10**9 * (i + 1) for i in range(4)]
    assert [r.ts_ns for r in records] == [min(max(t, -(1 << 63)), (1 << 63) - 1) for t in exact]
    assert stats.packets_read == 4


def _pcap_of(count):
    frames = [(i * 1000, udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, i.to_bytes(4, "big") * 40))
              for i in range(count)]
    return frames, pcap_bytes(frames)


def test_cut_gzip_keeps_records(tmp_path):
    frames, plain = _pcap_of(3000)
    packed = gzip_bytes(plain)
    cut = packed[: len(packed) * 3 // 4]
    recoverable = zlib.decompressobj(wbits=31).decompress(cut)
    whole_records = (len(recoverable) - 24) // (16 + len(frames[0][1]))
    path = tmp_path / "cut.pcap.gz"
    path.write_bytes(cut)
    stats = SkipCounter()

    records = read_all(path, stats)

    assert len(records) == whole_records
    assert whole_records > 2000
    assert [r.data for r in records] == [f for _, f in frames[:whole_records]]
    assert stats.packets_read == len(records) + stats.total_skipped


def test_gzip_trailing_garbage_ignored(tmp_path, caplog):
    frames, plain = _pcap_of(3000)
    path = tmp_path / "junk.pcap.gz"
    path.write_bytes(gzip_bytes(plain) + b"JUNKJUNK")

    with caplog.at_level(logging.WARNING):
        records = read_all(path)

    assert len(records) == 3000
    assert any("not gzip; they are ignored" in message for message in caplog.messages)


def test_gzip_without_trailer_reads_all(tmp_path):
    frames, plain = _pcap_of(5)
    packed = gzip_bytes(plain)
    path = tmp_path / "small.pcap.gz"
    # Without its 8-byte trailer the stream has every record but no end marker.
    path.write_bytes(packed[:-8])
    stats = SkipCounter()

    records = read_all(path, stats)

    assert [r.data for r in records] == [f for _, f in frames]
    assert stats.packets_read == len(records) + stats.total_skipped


def test_non_regular_files_rejected(tmp_path):
    fifo = tmp_path / "pipe.pcap"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.pcap"
    folder.mkdir()
    dangling = tmp_path / "gone.pcap"
    dangling.symlink_to(tmp_path / "missing.pcap")

    for path, reason in [(fifo, "not a regular file"), (folder, "is a directory"), (dangling, "cannot read")]:
        with pytest.raises(CaptureFormatError, match=reason):
            read_all(path)


def test_many_interface_blocks(tmp_path):
    interfaces = b"".join(pcapng_interface(linktype=1) for _ in range(3000))
    frames = [udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, bytes([i])) for i in range(3)]
    blocks = b"".join(pcapng_epb(2999, 1000 * i, frame) + pcapng_interface(linktype=1) for i, frame in enumerate(frames))
    path = tmp_path / "many.pcapng"
    path.write_bytes(pcapng_section() + interfaces + blocks)

    records = read_all(path)

    assert [r.data for r in records] == frames
    assert [r.ts_ns for r in records] == [1000 * i * 1000 for i in range(3)]


@pytest.mark.parametrize("tsresol", [0x80 | 20, 0x80 | 32, 6, 9, 12])
def test_pcapng_resolution_exact_ns(tmp_path, tsresol):
    # Units of a 2026 timestamp at the interface's resolution, or of an earlier one where 64 bits of
    # picoseconds do not reach 2026.
    exponent = tsresol & 0x7F
    per_second = (1 << exponent) if tsresol & 0x80 else 10 ** exponent
    seconds = min(1_796_400_000, (1 << 63) // per_second // 2)
    frames = [udp_frame("192.0.2.1", "192.0.2.2", 1000, 53, bytes([i])) for i in range(3)]
    units = [seconds * per_second + i * (per_second // 3 + 1) for i in range(3)]
    path = tmp_path / "resolution.pcapng"
    path.write_bytes(pcapng_section() + pcapng_interface(tsresol=tsresol)
                     + b"".join(pcapng_epb(0, u, f) for u, f in zip(units, frames)))

    records = read_all(path)

    assert [r.ts_ns for r in records] == [u * 10**9 // per_second for u in units]


def test_gzip_members_read_in_sequence(tmp_path):
    frames, plain = _pcap_of(3000)
    # The capture split into three gzip members at arbitrary byte positions, as `cat a.gz b.gz c.gz`.
    cuts = [0, 70_001, 400_003, len(plain)]
    path = tmp_path / "members.pcap.gz"
    path.write_bytes(b"".join(gzip_bytes(plain[start:end]) for start, end in zip(cuts, cuts[1:])))

    records = read_all(path)

    assert [r.data for r in records] == [f for _, f in frames]
