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
import logging
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numba
import numpy as np

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
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_CHUNK = 64 * 1024
# Bytes of a classic pcap read at once; its records are framed together.
_BLOCK = 1 << 20
# Maximum number of records in one `RecordBatch`.
BATCH_RECORDS = 4096


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


@dataclasses.dataclass(frozen=True, slots=True)
class RecordBatch:
    """Consecutive packet records of one capture file, as arrays over one buffer of frames."""

    # The bytes that hold the frames (uint8); frame i is buf[start[i] : start[i] + caplen[i]].
    buf: np.ndarray
    # Columns of int64, one entry per record: where its frame starts in `buf`, its captured and wire
    # lengths, link type, timestamp in nanoseconds, record number and byte offset in the file.
    start: np.ndarray
    caplen: np.ndarray
    wire_len: np.ndarray
    linktype: np.ndarray
    ts_ns: np.ndarray
    index: np.ndarray
    offset: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def frame(self, row: int) -> bytes:
        """Return the captured bytes of one record."""
        start = int(self.start[row])
        return self.buf[start : start + int(self.caplen[row])].tobytes()

    def record(self, row: int) -> Record:
        """Return one record as a `Record`."""
        return Record(int(self.index[row]), int(self.offset[row]), int(self.ts_ns[row]), int(self.linktype[row]),
                      self.frame(row), int(self.wire_len[row]))

    def take(self, rows: np.ndarray) -> RecordBatch:
        """Return the batch of the selected rows (a boolean mask or indices); `buf` is shared."""
        return RecordBatch(self.buf, self.start[rows], self.caplen[rows], self.wire_len[rows],
                           self.linktype[rows], self.ts_ns[rows], self.index[rows], self.offset[rows])

    @classmethod
    def from_records(cls, records: list[Record]) -> RecordBatch:
        """Pack records into one batch; their frames are copied into one buffer."""
        caplen = np.array([len(record.data) for record in records], dtype=np.int64)
        start = np.cumsum(caplen) - caplen
        column = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
        return cls(
            buf=np.frombuffer(b"".join([record.data for record in records]), dtype=np.uint8),
            start=start, caplen=caplen,
            wire_len=column([record.wire_len for record in records]),
            linktype=column([record.linktype for record in records]),
            # NOTE: a pcapng timestamp past the year 2262 (a damaged block) does not fit int64, so it is
            # clamped to the int64 range. A clamped timestamp still orders after every sane one.
            ts_ns=column([min(max(record.ts_ns, _INT64_MIN), _INT64_MAX) for record in records]),
            index=column([record.index for record in records]),
            offset=column([record.offset for record in records]),
        )


class _Truncated(Exception):
    """The stream ended, or failed to decompress, inside a record."""


class _Stream:
    """A binary stream that tracks its byte offset and turns decompression errors into _Truncated."""

    def __init__(self, raw: BinaryIO, prefix: bytes = b"") -> None:
        self.raw = raw
        self.prefix = prefix
        self.pos = 0
        # A decompression error met while reading ahead, raised by the next read.
        self.error: _Truncated | None = None

    def read(self, n: int) -> bytes:
        """Read up to n bytes; fewer only at the end of the stream."""
        out = b""
        if self.prefix:
            out, self.prefix = self.prefix[:n], self.prefix[n:]
            n -= len(out)
        while n > 0:
            if self.error is not None:
                if out:
                    break
                raise self.error
            try:
                chunk = self.raw.read(n)
            except (EOFError, OSError, zlib.error) as err:
                # Bytes read before the error are still good; the error is raised by the next read.
                self.error = _Truncated(str(err))
                self.error.__cause__ = err
                continue
            if not chunk:
                break
            out += chunk
            n -= len(chunk)
        self.pos += len(out)
        return out

    def unread(self, data: bytes) -> None:
        """Push bytes that were read back in front of the stream."""
        self.prefix = data + self.prefix
        self.pos -= len(data)

    def peek(self, n: int) -> bytes:
        """Return up to n next bytes without consuming them."""
        if len(self.prefix) >= n:
            return self.prefix[:n]
        head = self.read(n)
        self.unread(head)
        return head

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
    for batch in iter_record_batches(source, name, stats):
        for row in range(len(batch)):
            yield batch.record(row)


def iter_record_batches(
    source: str | os.PathLike | BinaryIO,
    name: str | None = None,
    stats: SkipCounter | None = None,
    max_records: int = BATCH_RECORDS,
) -> Iterator[RecordBatch]:
    """Yield the packet records of a capture in file order, in batches of at most `max_records`.

    Same records, counts and warnings as `iter_records`. A batch's buffer may be reused once the
    next batch is requested, so copy what must outlive it.
    """
    if max_records < 1:
        raise ValueError(f"max_records must be >= 1, got {max_records}")
    stats = stats if stats is not None else SkipCounter()
    label = source_name(source, name)
    if isinstance(source, (str, os.PathLike)):
        with _open_capture_file(source, label) as handle:
            yield from _iter_stream(handle, label, stats, max_records)
    else:
        yield from _iter_stream(source, label, stats, max_records)


def _open_capture_file(path: str | os.PathLike, name: str) -> BinaryIO:
    """Open a regular file for reading, or raise CaptureFormatError for anything else.

    A FIFO or device would block or never end, so only regular files (or links to them) are opened.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise CaptureFormatError(name, f"cannot read the file: {err.strerror or err}") from err
    if stat.S_ISDIR(mode):
        raise CaptureFormatError(name, "is a directory, not a capture file")
    if not stat.S_ISREG(mode):
        raise CaptureFormatError(name, "is not a regular file (a FIFO, socket or device); expected a capture file")
    try:
        return open(path, "rb")
    except OSError as err:
        raise CaptureFormatError(name, f"cannot read the file: {err.strerror or err}") from err


def _batched(items: Iterator[Record | RecordBatch], max_records: int) -> Iterator[RecordBatch]:
    """Group records into batches of at most `max_records`; batches pass through, in order."""
    pending: list[Record] = []
    for item in items:
        if isinstance(item, RecordBatch):
            if pending:
                yield RecordBatch.from_records(pending)
                pending = []
            yield item
            continue
        pending.append(item)
        if len(pending) >= max_records:
            yield RecordBatch.from_records(pending)
            pending = []
    if pending:
        yield RecordBatch.from_records(pending)


def source_name(source: str | os.PathLike | BinaryIO, name: str | None = None) -> str:
    """Return the label of a capture in warnings: `name`, else the path, else the stream's name."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def _iter_stream(handle: BinaryIO, name: str, stats: SkipCounter, max_records: int) -> Iterator[RecordBatch]:
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
        yield from _iter_pcap(stream, magic, name, stats, max_records)
    elif struct.unpack("<I", magic)[0] == PCAPNG_SHB:
        yield from _batched(_iter_pcapng(stream, name, stats, max_records), max_records)
    else:
        raise CaptureFormatError(
            name,
            f"unknown magic bytes {magic.hex()}; expected pcap (a1b2c3d4, a1b23c4d in either byte order), "
            "pcapng (0a0d0d0a) or gzip (1f8b)",
        )


def _open_gzip(handle: BinaryIO, magic: bytes, name: str) -> _Stream:
    # The magic bytes are already consumed, so they are replayed in front of the rest of the file.
    inner = _GunzipReader(magic, handle, name)
    try:
        first = inner.read(1)
    except (EOFError, zlib.error) as err:
        raise CaptureFormatError(name, f"invalid gzip data ({err}); the file looks compressed but is damaged") from err
    return _Stream(inner, prefix=first)


class _GunzipReader:
    """Decompress a gzip file incrementally, so that `read` returns every byte decompressed before damage.

    `gzip.GzipFile` raises on a cut or corrupt stream and drops what it decompressed in that call.
    Here the error is raised only once the good bytes are used up. Several members are read one
    after the other, as `zcat` does. Bytes after the last member that do not start another member
    are ignored with a warning.
    """

    def __init__(self, magic: bytes, rest: BinaryIO, name: str) -> None:
        self._rest = rest
        self._name = name
        self._decoder = zlib.decompressobj(wbits=31)
        # Compressed bytes read but not yet given to the decoder.
        self._input = magic
        self._output = b""
        self._started = False
        self._error: Exception | None = None
        self._done = False

    def read(self, n: int) -> bytes:
        while not self._output and not self._done:
            self._decompress_more()
        if not self._output:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            return b""
        out, self._output = self._output[:n], self._output[n:]
        return out

    def _decompress_more(self) -> None:
        data = self._decoder.unconsumed_tail or self._input
        self._input = b""
        if not data:
            data = self._rest.read(_CHUNK)
            if not data:
                if self._started and not self._decoder.eof:
                    self._error = EOFError("compressed file ended before the end-of-stream marker was reached")
                self._done = True
                return
        self._started = True
        try:
            self._output += self._decoder.decompress(data, _CHUNK)
        except zlib.error as err:
            self._error = err
            self._done = True
            return
        if not self._decoder.eof:
            return

        # One member ended: another may follow.
        following = self._decoder.unused_data
        if len(following) < 2:
            following += self._rest.read(2 - len(following))
        if not following:
            self._done = True
        elif following[:2] == _GZIP_MAGIC:
            self._decoder = zlib.decompressobj(wbits=31)
            self._input = following
            self._started = False
        else:
            logger.warning("%s: %d or more bytes after the gzip data are not gzip; they are ignored",
                           self._name, len(following))
            self._done = True


# ---------------------------------------------------------------------------------------------------
# Classic pcap.


# Results of `_frame_pcap`: it stopped at a record that does not fit in the block, at a record
# whose captured length is absurd, or because the batch is full.
_NEED_MORE, _ABSURD, _FULL = 0, 1, 2


@numba.njit(cache=True, inline="always")
def _u32_at(block, pos, big_endian):
    if big_endian:
        return (np.int64(block[pos]) << 24) | (np.int64(block[pos + 1]) << 16) | \
            (np.int64(block[pos + 2]) << 8) | np.int64(block[pos + 3])
    return (np.int64(block[pos + 3]) << 24) | (np.int64(block[pos + 2]) << 16) | \
        (np.int64(block[pos + 1]) << 8) | np.int64(block[pos])


@numba.njit(cache=True)
def _frame_pcap(block, pos, big_endian, limit, starts, caplens, wire_lens, seconds, fractions):
    """Frame the classic pcap records of `block` from `pos`; return (records, next position, why stopped)."""
    count = 0
    size = block.shape[0]
    while count < starts.shape[0]:
        if pos + 16 > size:
            return count, pos, _NEED_MORE
        caplen = _u32_at(block, pos + 8, big_endian)
        if caplen > limit:
            return count, pos, _ABSURD
        if pos + 16 + caplen > size:
            return count, pos, _NEED_MORE
        starts[count] = pos + 16
        caplens[count] = caplen
        wire_lens[count] = _u32_at(block, pos + 12, big_endian)
        seconds[count] = _u32_at(block, pos, big_endian)
        fractions[count] = _u32_at(block, pos + 4, big_endian)
        count += 1
        pos += 16 + caplen
    return count, pos, _FULL


def _iter_pcap(stream: _Stream, magic: bytes, name: str, stats: SkipCounter,
               max_records: int) -> Iterator[RecordBatch]:
    order, ns_per_unit = _PCAP_MAGICS[magic]
    try:
        header = stream.read_exact(20)
    except _Truncated as err:
        raise CaptureFormatError(name, "truncated pcap global header (shorter than 24 bytes)") from err
    _, _, _, _, snaplen, network = struct.unpack(order + "HHiIII", header)
    # The upper bits of the link-type field carry FCS information; only the low 26 bits name the type.
    linktype = network & 0x03FFFFFF
    # A snaplen of 0 means "unknown" in some writers, so only the absolute cap applies then.
    limit = min(MAX_RECORD_BYTES, snaplen + SNAPLEN_SLACK) if snaplen else MAX_RECORD_BYTES

    # Blocks of the file are framed by the compiled loop. `pending` holds the bytes not framed yet,
    # starting at file offset `base`; a record cut by the block end waits for the next block.
    index = 0
    base = stream.pos
    pending = b""
    ended = False
    failure: _Truncated | None = None
    columns = [np.empty(max_records, dtype=np.int64) for _ in range(5)]
    while True:
        if not ended and len(pending) < _BLOCK:
            try:
                chunk = stream.read(_BLOCK)
            except _Truncated as err:
                chunk, failure = b"", err
            if chunk:
                pending = pending + chunk if pending else chunk
            else:
                ended = True

        block = np.frombuffer(pending, dtype=np.uint8)
        count, pos, stop_reason = _frame_pcap(block, 0, order == ">", limit, *columns)
        if count:
            starts, caplens, wire_lens, seconds, fractions = (column[:count].copy() for column in columns)
            stats.count_read(count)
            yield RecordBatch(
                buf=block, start=starts, caplen=caplens, wire_len=wire_lens,
                linktype=np.full(count, linktype, dtype=np.int64),
                ts_ns=seconds * _NS_PER_S + fractions * ns_per_unit,
                index=np.arange(index, index + count, dtype=np.int64),
                offset=base + starts - 16,
            )
            index += count
        pending = pending[pos:]
        base += pos
        where = f"record {index} at byte offset {base}"

        if stop_reason == _ABSURD:
            caplen = struct.unpack_from(order + "I", pending, 8)[0]
            stats.count_read()
            stats.count_skipped(
                "absurd_record_length", name, where,
                f"captured length {caplen} exceeds {limit} (snaplen {snaplen}); "
                "record boundaries are lost, so the rest of the file is not read",
            )
            return
        if stop_reason == _FULL or not ended:
            continue
        if failure is not None:
            # Only a damaged or cut gzip stream fails here.
            stats.count_read()
            stats.count_skipped("truncated_record", name, where, f"compressed data ends or is damaged ({failure})")
            return
        if not pending:
            return
        stats.count_read()
        if len(pending) < 16:
            detail = f"file ends inside the 16-byte record header ({len(pending)} bytes present)"
        else:
            caplen = struct.unpack_from(order + "I", pending, 8)[0]
            detail = f"file ends inside the packet data ({caplen - (len(pending) - 16)} of {caplen} bytes missing)"
        stats.count_skipped("truncated_record", name, where, detail)
        return


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


def _iter_pcapng(stream: _Stream, name: str, stats: SkipCounter,
                 max_records: int = BATCH_RECORDS) -> Iterator[Record | RecordBatch]:
    # The four magic bytes of the first Section Header Block are already consumed.
    order = _read_section_header(stream, name, offset=0, first=True)
    interfaces: list[_Interface] = []
    index = 0
    last_ts = 0
    # How much the compiled framer reads at once: a whole block after it framed records, little after
    # it framed none, so that files of mostly other blocks are not copied around in large pieces.
    fast_read = _BLOCK
    columns = [np.empty(max_records, dtype=np.int64) for _ in range(6)]
    # The interface columns the compiled framer reads; rebuilt only after the interfaces change.
    interface_table: _InterfaceTable | None = None

    while True:
        if interfaces and _next_block_type(stream, order) == PCAPNG_EPB:
            # Fast path: frame the run of well-formed enhanced packet blocks that starts here. Anything
            # else (other blocks, damage, the end of the file) is left to the block-by-block code below.
            if interface_table is None:
                interface_table = _InterfaceTable.of(interfaces)
            batch = _frame_pcapng_run(stream, order, interface_table, index, fast_read, columns)
            if batch is not None:
                stats.count_read(len(batch))
                index += len(batch)
                last_ts = int(batch.ts_ns[-1])
                fast_read = _BLOCK
                yield batch
                continue
            fast_read = _SMALL_READ

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
            stream.unread(head[4:])
            try:
                order = _read_section_header(stream, name, offset, first=False)
            except _Truncated:
                logger.warning("%s: byte offset %d: file ends inside a section header", name, offset)
                return
            if order is None:
                return
            interfaces = []
            interface_table = None
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
            interface_table = None
            continue
        if not is_packet:
            continue

        record = _parse_packet_block(block_type, body, order, interfaces, last_ts, index, offset, name, stats)
        index += 1
        if record is not None:
            last_ts = record.ts_ns
            yield record


# Bytes the pcapng framer reads when its last attempt framed nothing.
_SMALL_READ = 4 * 1024
# Why `_frame_epbs` stopped: the next block is not complete in the buffer, is not a well-formed
# enhanced packet block, or the batch is full.
_EPB_NEED_MORE, _EPB_OTHER, _EPB_FULL = 0, 1, 2
# Largest timestamp unit count times multiplier that the compiled framer computes in int64.
_MAX_SCALED_UNITS = 1 << 62
# Largest interface time offset (if_tsoffset) the compiled framer adds: with a scaled timestamp of at
# most 2^62 the sum stays inside int64.
_MAX_FAST_OFFSET_NS = 1 << 61


@dataclasses.dataclass(frozen=True, slots=True)
class _InterfaceTable:
    """Per-interface columns for the compiled framer. A `divs` entry of 0 marks an interface for the Python reader."""

    linktypes: np.ndarray
    muls: np.ndarray
    divs: np.ndarray
    offsets_ns: np.ndarray

    @classmethod
    def of(cls, interfaces: list[_Interface]) -> _InterfaceTable:
        # A huge resolution or time offset needs Python's unbounded integers.
        usable = [i.div * i.mul <= _MAX_SCALED_UNITS and abs(i.offset_ns) <= _MAX_FAST_OFFSET_NS for i in interfaces]
        column = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
        return cls(linktypes=column([i.linktype for i in interfaces]),
                   muls=column([i.mul if ok else 1 for i, ok in zip(interfaces, usable)]),
                   divs=column([i.div if ok else 0 for i, ok in zip(interfaces, usable)]),
                   offsets_ns=column([i.offset_ns if ok else 0 for i, ok in zip(interfaces, usable)]))


def _next_block_type(stream: _Stream, order: str) -> int | None:
    """Return the type of the next pcapng block without consuming it, or None at the end or on damage."""
    try:
        head = stream.peek(4)
    except _Truncated:
        return None
    if len(head) < 4:
        return None
    return struct.unpack(order + "I", head)[0]


def _frame_pcapng_run(stream: _Stream, order: str, table: _InterfaceTable, index: int, size: int,
                      columns: list[np.ndarray]) -> RecordBatch | None:
    """Frame consecutive enhanced packet blocks from the stream; return them, or None if none framed.

    The bytes after the last framed block are pushed back into the stream, so the block-by-block
    reader continues exactly where the framer stopped.
    """
    base = stream.pos
    try:
        chunk = stream.read(size)
    except _Truncated:
        # The error stays with the stream, so the block-by-block reader meets it again and reports it.
        return None
    if not chunk:
        return None
    block = np.frombuffer(chunk, dtype=np.uint8)
    count, pos, _ = _frame_epbs(block, order == ">", table.linktypes, table.muls, table.divs, table.offsets_ns,
                                MAX_PACKET_BLOCK_BYTES, *columns)
    stream.unread(chunk[pos:])
    if count == 0:
        return None
    starts, caplens, wire_lens, linktypes, ts_ns, positions = (column[:count].copy() for column in columns)
    return RecordBatch(buf=block, start=starts, caplen=caplens, wire_len=wire_lens, linktype=linktypes,
                       ts_ns=ts_ns, index=np.arange(index, index + count, dtype=np.int64), offset=base + positions)


@numba.njit(cache=True)
def _frame_epbs(block, big_endian, linktypes_by_id, muls, divs, offsets_ns, max_block, starts, caplens, wire_lens,
                linktypes, ts_ns, positions):
    """Frame well-formed enhanced packet blocks from the start of `block`; return (records, end, why stopped).

    An interface whose `divs` entry is 0 cannot be handled here (the table guarantees div * mul <= 2^62
    for the others), nor can a timestamp whose scaled value might not fit int64; the framer stops
    before such a block.
    """
    count = 0
    pos = 0
    size = block.shape[0]
    while count < starts.shape[0]:
        if pos + 8 > size:
            return count, pos, _EPB_NEED_MORE
        block_type = _u32_at(block, pos, big_endian)
        length = _u32_at(block, pos + 4, big_endian)
        # 12 bytes of block framing and 20 of fixed enhanced packet block fields.
        if block_type != PCAPNG_EPB or length < 32 or length % 4 or length > max_block:
            return count, pos, _EPB_OTHER
        if pos + length > size:
            return count, pos, _EPB_NEED_MORE
        if _u32_at(block, pos + length - 4, big_endian) != length:
            return count, pos, _EPB_OTHER
        interface = _u32_at(block, pos + 8, big_endian)
        caplen = _u32_at(block, pos + 20, big_endian)
        if caplen > length - 32 or interface >= linktypes_by_id.shape[0] or divs[interface] == 0:
            return count, pos, _EPB_OTHER
        units = (_u32_at(block, pos + 12, big_endian) << 32) | _u32_at(block, pos + 16, big_endian)
        # units * mul // div, split so that no product leaves int64: units = whole * div + part.
        whole = units // divs[interface]
        part = units - whole * divs[interface]
        if units < 0 or whole > _MAX_SCALED_UNITS // muls[interface]:
            return count, pos, _EPB_OTHER
        starts[count] = pos + 28
        caplens[count] = caplen
        wire_lens[count] = _u32_at(block, pos + 24, big_endian)
        linktypes[count] = linktypes_by_id[interface]
        ts_ns[count] = whole * muls[interface] + part * muls[interface] // divs[interface] + offsets_ns[interface]
        positions[count] = pos
        count += 1
        pos += length
    return count, pos, _EPB_FULL


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
