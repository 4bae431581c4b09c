"""Streaming reader for pcap, pcapng and gzip-compressed captures.

`iter_records(source, name, stats)` yields one `Record` per packet record, reading the file record by
record, so memory does not grow with the file size. The format comes from the first four bytes, never
from the file name:

- classic pcap: magic a1b2c3d4 (microsecond timestamps) or a1b23c4d (nanosecond), in either byte order;
- pcapng: block type 0a0d0d0a. Sections may differ in byte order. Each interface keeps its link type,
  snapshot length, `if_tsresol` (default 10^-6 s) and `if_tsoffset`. Enhanced, Simple and obsolete Packet
  Blocks are read; every other block type is skipped without being held in memory;
- gzip (1f8b): decompressed on the fly, then detected again. Offsets then count decompressed bytes.

Timestamps are integer nanoseconds since the epoch. A Simple Packet Block has no timestamp, so it gets
the timestamp of the previous packet record of the file (0 if it is the first). Its captured length is
min(original length, snaplen of interface 0, room in the block).

Damaged records are counted in `stats` (see `stats.SkipCounter`) with a warning naming the file and the
byte offset where the record starts:

- `absurd_record_length`: a captured length above `MAX_RECORD_BYTES` or above the pcap snaplen plus
  `SNAPLEN_SLACK`, or a pcapng block longer than its cap. The record is not read and reading stops,
  because record boundaries after it cannot be trusted.
- `bad_block_length`: a pcapng block length below 12 or not a multiple of 4, or a trailing length that
  differs from the leading one. Reading stops for the same reason.
- `truncated_record`: the file ends inside a record header, packet data or final block. The partial
  record is never passed on as a shorter packet.
- `bad_caplen` and `unknown_interface`: a pcapng packet block whose fields do not fit the block or name
  an interface that the section never described. The block boundary is intact, so reading continues.

Files that are not captures at all raise `CaptureFormatError`. Valid files without packets yield nothing.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from etbert_jax.capture.stats import SkipCounter

logger = logging.getLogger(__name__)

# Largest captured length accepted for one record (256 KiB, the largest snaplen libpcap uses).
MAX_RECORD_BYTES = 256 * 1024
# Bytes a pcap record may exceed the file's snaplen by before it counts as absurd.
SNAPLEN_SLACK = 4096
# Largest pcapng block of a type that is skipped (name resolution, statistics, custom blocks).
MAX_OTHER_BLOCK_BYTES = 16 * 1024 * 1024
# Largest pcapng packet block: the largest record plus room for the block's fields and options.
MAX_PACKET_BLOCK_BYTES = MAX_RECORD_BYTES + 64 * 1024

PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_OPB = 0x00000002  # obsolete Packet Block
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
PCAPNG_PACKET_BLOCKS = (PCAPNG_OPB, PCAPNG_SPB, PCAPNG_EPB)
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000),  # little-endian, microseconds
    b"\xa1\xb2\xc3\xd4": (">", 1000),  # big-endian, microseconds
    b"\x4d\x3c\xb2\xa1": ("<", 1),  # little-endian, nanoseconds
    b"\xa1\xb2\x3c\x4d": (">", 1),  # big-endian, nanoseconds
}
_GZIP_MAGIC = b"\x1f\x8b"
_NS_PER_S = 1_000_000_000
_CHUNK = 64 * 1024


class CaptureFormatError(ValueError):
    """The input is not a readable pcap, pcapng or gzip-compressed capture."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One packet record of a capture file."""

    # 0-based number of the packet record in the file, damaged records included.
    index: int
    # Byte offset of the record header (pcap) or block (pcapng) in the (decompressed) file.
    offset: int
    # Timestamp in integer nanoseconds since the epoch.
    ts_ns: int
    # Link-layer header type (LINKTYPE_* value) of the record's interface.
    linktype: int
    # Captured bytes, starting at the link-layer header.
    data: bytes
    # Length of the packet on the wire; larger than len(data) when the snaplen cut it.
    wire_len: int


class _Truncated(Exception):
    """The stream ended, or failed to decompress, inside a record."""


class _Stream:
    """A binary stream that tracks its byte offset and turns decompression errors into _Truncated."""

    def __init__(self, raw: BinaryIO, prefix: bytes = b"") -> None:
        self.raw = raw
        self.prefix = prefix
        self.pos = 0

    def read(self, n: int) -> bytes:
        """Read up to n bytes; fewer only at the end of the stream."""
        out = b""
        if self.prefix:
            out, self.prefix = self.prefix[:n], self.prefix[n:]
            n -= len(out)
        while n > 0:
            try:
                chunk = self.raw.read(n)
            except (EOFError, OSError, zlib.error) as err:
                raise _Truncated(str(err)) from err
            if not chunk:
                break
            out += chunk
            n -= len(chunk)
        self.pos += len(out)
        return out

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise _Truncated(f"{n - len(data)} of {n} bytes missing")
        return data

    def skip(self, n: int) -> None:
        """Discard n bytes in chunks, so that a large block never sits in memory."""
        while n > 0:
            step = min(n, _CHUNK)
            self.read_exact(step)
            n -= step


def iter_records(
    source: str | os.PathLike | BinaryIO,
    name: str | None = None,
    stats: SkipCounter | None = None,
) -> Iterator[Record]:
    """Yield the packet records of a capture file path or binary file object, in file order.

    `name` labels warnings and errors (default: the path). Raises `CaptureFormatError` on the first
    `next()` when the input is not a capture.
    """
    stats = stats if stats is not None else SkipCounter()
    label = source_name(source, name)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            yield from _iter_stream(handle, label, stats)
    else:
        yield from _iter_stream(source, label, stats)


def source_name(source: str | os.PathLike | BinaryIO, name: str | None = None) -> str:
    """Return the label of a capture in warnings: `name`, else the path, else the stream's name."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def _iter_stream(handle: BinaryIO, name: str, stats: SkipCounter) -> Iterator[Record]:
    stream = _Stream(handle)
    magic = stream.read(4)
    if magic[:2] == _GZIP_MAGIC:
        stream = _open_gzip(handle, magic, name)
        try:
            magic = stream.read(4)
        except _Truncated as err:
            raise CaptureFormatError(name, f"invalid gzip data ({err}); the file looks compressed but is damaged") from err
        if len(magic) < 4:
            raise CaptureFormatError(name, "gzip file does not contain a capture (fewer than 4 bytes inside)")
        if magic[:2] == _GZIP_MAGIC:
            raise CaptureFormatError(name, "gzip inside gzip is not supported; decompress the file once")
    if len(magic) == 0:
        raise CaptureFormatError(name, "empty file; expected a pcap, pcapng or gzip capture")
    if len(magic) < 4:
        raise CaptureFormatError(name, f"file has only {len(magic)} bytes; a capture header needs at least 24")
    if magic in _PCAP_MAGICS:
        yield from _iter_pcap(stream, magic, name, stats)
    elif struct.unpack("<I", magic)[0] == PCAPNG_SHB:
        yield from _iter_pcapng(stream, name, stats)
    else:
        raise CaptureFormatError(
            name,
            f"unknown magic bytes {magic.hex()}; expected pcap (a1b2c3d4, a1b23c4d in either byte order), "
            "pcapng (0a0d0d0a) or gzip (1f8b)",
        )


def _open_gzip(handle: BinaryIO, magic: bytes, name: str) -> _Stream:
    # The magic bytes are already consumed, so they are replayed in front of the rest of the file.
    inner = gzip.GzipFile(fileobj=io.BufferedReader(_PrefixedReader(magic, handle), buffer_size=_CHUNK), mode="rb")
    stream = _Stream(io.BufferedReader(inner, buffer_size=_CHUNK))
    try:
        stream.raw.peek(1)
    except (EOFError, OSError, zlib.error) as err:
        raise CaptureFormatError(name, f"invalid gzip data ({err}); the file looks compressed but is damaged") from err
    return stream


class _PrefixedReader(io.RawIOBase):
    """Replay already-consumed magic bytes in front of the rest of a stream."""

    def __init__(self, prefix: bytes, rest: BinaryIO) -> None:
        self._prefix = prefix
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# ---------------------------------------------------------------------------------------------------
# Classic pcap.


def _iter_pcap(stream: _Stream, magic: bytes, name: str, stats: SkipCounter) -> Iterator[Record]:
    order, ns_per_unit = _PCAP_MAGICS[magic]
    try:
        header = stream.read_exact(20)
    except _Truncated as err:
        raise CaptureFormatError(name, "truncated pcap global header (shorter than 24 bytes)") from err
    _, _, _, _, snaplen, network = struct.unpack(order + "HHiIII", header)
    # The upper bits of the link-type field carry FCS information; only the low 26 bits name the type.
    linktype = network & 0x03FFFFFF
    record_header = struct.Struct(order + "IIII")
    # A snaplen of 0 means "unknown" in some writers, so only the absolute cap applies then.
    limit = min(MAX_RECORD_BYTES, snaplen + SNAPLEN_SLACK) if snaplen else MAX_RECORD_BYTES
    index = 0

    while True:
        offset = stream.pos
        try:
            head = stream.read(16)
        except _Truncated as err:
            # Only a damaged or cut gzip stream fails here.
            stats.count_read()
            stats.count_skipped(
                "truncated_record", name, f"record {index} at byte offset {offset}",
                f"compressed data ends or is damaged ({err})",
            )
            return
        if not head:
            return
        stats.count_read()
        if len(head) < 16:
            stats.count_skipped(
                "truncated_record", name, f"record {index} at byte offset {offset}",
                f"file ends inside the 16-byte record header ({len(head)} bytes present)",
            )
            return
        ts_sec, ts_frac, caplen, wire_len = record_header.unpack(head)
        if caplen > limit:
            stats.count_skipped(
                "absurd_record_length", name, f"record {index} at byte offset {offset}",
                f"captured length {caplen} exceeds {limit} (snaplen {snaplen}); "
                "record boundaries are lost, so the rest of the file is not read",
            )
            return
        try:
            data = stream.read_exact(caplen)
        except _Truncated as err:
            stats.count_skipped(
                "truncated_record", name, f"record {index} at byte offset {offset}",
                f"file ends inside the packet data ({err})",
            )
            return
        ts_ns = ts_sec * _NS_PER_S + ts_frac * ns_per_unit
        yield Record(index, offset, ts_ns, linktype, data, wire_len)
        index += 1


# ---------------------------------------------------------------------------------------------------
# pcapng.


@dataclasses.dataclass(slots=True)
class _Interface:
    linktype: int
    snaplen: int
    # Timestamp units: ns = units * mul // div (integers only).
    mul: int = 1000
    div: int = 1
    offset_ns: int = 0

    def ts_ns(self, units: int) -> int:
        return units * self.mul // self.div + self.offset_ns


def _iter_pcapng(stream: _Stream, name: str, stats: SkipCounter) -> Iterator[Record]:
    # The four magic bytes of the first Section Header Block are already consumed.
    order = _read_section_header(stream, name, offset=0, first=True)
    interfaces: list[_Interface] = []
    index = 0
    last_ts = 0

    while True:
        offset = stream.pos
        try:
            head = stream.read(8)
        except _Truncated as err:
            logger.warning("%s: byte offset %d: stream ends with a damaged block (%s)", name, offset, err)
            return
        if not head:
            return
        if len(head) < 8:
            logger.warning("%s: byte offset %d: file ends inside a block header; reading stops", name, offset)
            return
        block_type = struct.unpack(order + "I", head[:4])[0]
        if block_type == PCAPNG_SHB:
            stream.prefix = head[4:]
            stream.pos -= 4
            try:
                order = _read_section_header(stream, name, offset, first=False)
            except _Truncated:
                logger.warning("%s: byte offset %d: file ends inside a section header", name, offset)
                return
            if order is None:
                return
            interfaces = []
            continue

        length = struct.unpack(order + "I", head[4:])[0]
        is_packet = block_type in PCAPNG_PACKET_BLOCKS
        where = f"record {index} at byte offset {offset}" if is_packet else f"block at byte offset {offset}"
        if is_packet:
            stats.count_read()
        cap = MAX_PACKET_BLOCK_BYTES if is_packet else MAX_OTHER_BLOCK_BYTES
        if length < 12 or length % 4:
            _block_problem(stats, is_packet, "bad_block_length", name, where,
                           f"block length {length} is below 12 or not a multiple of 4; reading stops")
            return
        if length > cap:
            _block_problem(stats, is_packet, "absurd_record_length", name, where,
                           f"block length {length} exceeds {cap}; reading stops")
            return

        try:
            if not is_packet and block_type != PCAPNG_IDB:
                stream.skip(length - 12)
                body = b""
            else:
                body = stream.read_exact(length - 12)
            trailer = stream.read_exact(4)
        except _Truncated as err:
            _block_problem(stats, is_packet, "truncated_record", name, where,
                           f"file ends inside the block ({err})")
            return
        if struct.unpack(order + "I", trailer)[0] != length:
            _block_problem(stats, is_packet, "bad_block_length", name, where,
                           "trailing block length differs from the leading one; reading stops")
            return

        if block_type == PCAPNG_IDB:
            interfaces.append(_parse_interface(body, order, name, offset))
            continue
        if not is_packet:
            continue

        record = _parse_packet_block(block_type, body, order, interfaces, last_ts, index, offset, name, stats)
        index += 1
        if record is not None:
            last_ts = record.ts_ns
            yield record


def _block_problem(stats: SkipCounter, is_packet: bool, reason: str, name: str, where: str, detail: str) -> None:
    if is_packet:
        stats.count_skipped(reason, name, where, detail)
    else:
        logger.warning("%s: %s: %s (%s)", name, where, detail, reason)


def _read_section_header(stream: _Stream, name: str, offset: int, first: bool) -> str | None:
    """Read a Section Header Block after its type field; return the section's struct byte order."""
    try:
        head = stream.read_exact(8)
    except _Truncated as err:
        if first:
            raise CaptureFormatError(name, "truncated pcapng section header") from err
        raise
    magic = head[4:]
    if magic == b"\x4d\x3c\x2b\x1a":
        order = "<"
    elif magic == b"\x1a\x2b\x3c\x4d":
        order = ">"
    else:
        if first:
            raise CaptureFormatError(name, f"pcapng section header has invalid byte-order magic {magic.hex()}")
        logger.warning("%s: byte offset %d: invalid section byte-order magic %s; reading stops", name, offset, magic.hex())
        return None
    length = struct.unpack(order + "I", head[:4])[0]
    if length < 28 or length % 4 or length > MAX_OTHER_BLOCK_BYTES:
        if first:
            raise CaptureFormatError(name, f"pcapng section header has invalid block length {length}")
        logger.warning("%s: byte offset %d: invalid section header length %d; reading stops", name, offset, length)
        return None
    # Version, section length, options and the trailing length are not needed.
    try:
        stream.skip(length - 12)
    except _Truncated as err:
        if first:
            raise CaptureFormatError(name, f"pcapng section header of {length} bytes is cut short") from err
        raise
    return order


def _parse_interface(body: bytes, order: str, name: str, offset: int) -> _Interface:
    if len(body) < 8:
        logger.warning("%s: byte offset %d: interface description block is too short", name, offset)
        return _Interface(linktype=-1, snaplen=0)
    linktype, _, snaplen = struct.unpack_from(order + "HHI", body, 0)
    interface = _Interface(linktype=linktype, snaplen=snaplen)
    for code, value in _iter_options(body, 8, order):
        if code == 9 and len(value) >= 1:  # if_tsresol
            resolution = value[0]
            exponent = resolution & 0x7F
            if resolution & 0x80:
                # Units of 2^-exponent seconds.
                interface.mul, interface.div = _NS_PER_S, 1 << exponent
            elif exponent <= 9:
                interface.mul, interface.div = 10 ** (9 - exponent), 1
            else:
                interface.mul, interface.div = 1, 10 ** (exponent - 9)
        elif code == 14 and len(value) >= 8:  # if_tsoffset, whole seconds
            interface.offset_ns = struct.unpack(order + "q", value[:8])[0] * _NS_PER_S
    return interface


def _iter_options(body: bytes, start: int, order: str) -> Iterator[tuple[int, bytes]]:
    pos = start
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(order + "HH", body, pos)
        if code == 0:
            return
        value = body[pos + 4 : pos + 4 + length]
        yield code, value
        pos += 4 + ((length + 3) & ~3)


def _parse_packet_block(
    block_type: int,
    body: bytes,
    order: str,
    interfaces: list[_Interface],
    last_ts: int,
    index: int,
    offset: int,
    name: str,
    stats: SkipCounter,
) -> Record | None:
    where = f"record {index} at byte offset {offset}"
    if block_type == PCAPNG_SPB:
        if len(body) < 4:
            stats.count_skipped("bad_caplen", name, where, "simple packet block without a length field")
            return None
        if not interfaces:
            stats.count_skipped("unknown_interface", name, where, "simple packet block before any interface block")
            return None
        wire_len = struct.unpack_from(order + "I", body, 0)[0]
        caplen = min(wire_len, len(body) - 4)
        if interfaces[0].snaplen:
            caplen = min(caplen, interfaces[0].snaplen)
        return Record(index, offset, last_ts, interfaces[0].linktype, bytes(body[4 : 4 + caplen]), wire_len)

    if block_type == PCAPNG_EPB:
        if len(body) < 20:
            stats.count_skipped("bad_caplen", name, where, "enhanced packet block shorter than its fixed fields")
            return None
        interface_id, ts_high, ts_low, caplen, wire_len = struct.unpack_from(order + "IIIII", body, 0)
        data_start = 20
    else:  # obsolete Packet Block
        if len(body) < 20:
            stats.count_skipped("bad_caplen", name, where, "packet block shorter than its fixed fields")
            return None
        interface_id, _, ts_high, ts_low, caplen, wire_len = struct.unpack_from(order + "HHIIII", body, 0)
        data_start = 20

    if caplen > len(body) - data_start:
        stats.count_skipped("bad_caplen", name, where, f"captured length {caplen} does not fit in the block")
        return None
    if interface_id >= len(interfaces):
        stats.count_skipped(
            "unknown_interface", name, where,
            f"interface id {interface_id}, but the section describes {len(interfaces)} interfaces",
        )
        return None
    interface = interfaces[interface_id]
    ts_ns = interface.ts_ns((ts_high << 32) | ts_low)
    data = bytes(body[data_start : data_start + caplen])
    return Record(index, offset, ts_ns, interface.linktype, data, wire_len)
