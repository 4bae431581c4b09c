"""`tf.train.Example` bytes and TFRecord files, written without importing TensorFlow.

Beam workers and the input benchmark build millions of small examples. Importing TensorFlow there
costs seconds and gigabytes per process, so the protobuf wire format is written here by hand:

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # each entry: key = 1, value = 2
    Feature  { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; }
    BytesList { repeated bytes value = 1; }   FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }

Map entries are written in sorted key order, so equal inputs always give equal bytes. A TFRecord
file is a sequence of `uint64 length (LE) | masked crc32c(length) | data | masked crc32c(data)`.

The feature specs for parsing (`pretrain_feature_spec`, `finetune_feature_spec`) import
TensorFlow lazily, only when they are called. The record layout is fixed in docs/architecture.md.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO

import google_crc32c
import numpy as np

# Protobuf wire types.
_VARINT = 0
_LENGTH_DELIMITED = 2

# TFRecord's CRC mask constant (the same as LevelDB's log format).
_CRC_MASK_DELTA = 0xA282EAD8


# ---- protobuf primitives ---------------------------------------------------------------------

# The one-byte varints of 0 .. 127: field tags, short lengths, labels.
_ONE_BYTE_VARINTS = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
    """Encode one integer as a protobuf varint; negative values take 10 bytes (two's complement)."""
    if 0 <= value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Values below this bound are encoded from a table of precomputed varints, which is built on first use.
# It covers the token ids of both vocabularies, segment ids, labels and small packet indices.
_VARINT_TABLE_LIMIT = 1 << 17
_varint_table: list[bytes] = []


def _build_varint_table() -> list[bytes]:
    """Return the varints of 0 .. _VARINT_TABLE_LIMIT - 1 (one, two or three bytes each)."""
    one = [bytes((value,)) for value in range(0x80)]
    two = [bytes(((value & 0x7F) | 0x80, value >> 7)) for value in range(0x80, 1 << 14)]
    three = [bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
             for value in range(1 << 14, _VARINT_TABLE_LIMIT)]
    return one + two + three


def _varints(values: np.ndarray) -> bytes:
    """Encode an integer array as concatenated varints.

    Arrays whose values all lie in [0, 2**17) are joined from a table; any other array goes through
    the vectorized numpy encoder. Both give the same bytes.
    """
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    if array.size == 0:
        return b""
    # Seen as unsigned, negative values are at least 2**63, so one maximum checks both ends.
    if array.view(np.uint64).max() < _VARINT_TABLE_LIMIT:
        if not _varint_table:
            _varint_table.extend(_build_varint_table())
        table = _varint_table
        return b"".join([table[value] for value in array.tolist()])
    return _varints_numpy(array)


def _varints_numpy(values: np.ndarray) -> bytes:
    """Encode an integer array as concatenated varints, vectorized with numpy (any int64 values)."""
    unsigned = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    if unsigned.size == 0:
        return b""

    # Bytes per value: one, plus one for every further 7-bit group that is not all zero.
    lengths = np.ones(unsigned.shape, dtype=np.int64)
    for group in range(1, 10):
        lengths += unsigned >= np.uint64(1 << (7 * group))

    starts = np.cumsum(lengths) - lengths
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    for group in range(10):
        present = lengths > group
        if not present.any():
            break
        chunk = (unsigned[present] >> np.uint64(7 * group)) & np.uint64(0x7F)
        more = (lengths[present] > group + 1).astype(np.uint64) << np.uint64(7)
        out[starts[present] + group] = (chunk | more).astype(np.uint8)
    return out.tobytes()


# Tags of length-delimited fields 0 .. 15, which fit one byte.
_LENGTH_DELIMITED_TAGS = [_ONE_BYTE_VARINTS[(number << 3) | _LENGTH_DELIMITED] for number in range(16)]


def _field(number: int, payload: bytes) -> bytes:
    """Encode a length-delimited field: tag, byte length, payload."""
    tag = _LENGTH_DELIMITED_TAGS[number] if number < 16 else _varint((number << 3) | _LENGTH_DELIMITED)
    length = len(payload)
    prefix = _ONE_BYTE_VARINTS[length] if length < 0x80 else _varint(length)
    return tag + prefix + payload


def _int64_scalar_feature(value: int) -> bytes:
    """Encode an `Int64List` feature of one value; equal to `int64_feature([value])`."""
    value = int(value)
    if not -(1 << 63) <= value < (1 << 63):
        return int64_feature([value])  # numpy raises the usual OverflowError
    return _field(3, _field(1, _varint(value)))


def _bytes_scalar_feature(value: bytes | str) -> bytes:
    """Encode a `BytesList` feature of one value; equal to `bytes_feature([value])`."""
    return _field(1, _field(1, value.encode("utf-8") if isinstance(value, str) else bytes(value)))


# ---- features --------------------------------------------------------------------------------

def int64_feature(values: Sequence[int] | np.ndarray) -> bytes:
    """Encode a `Feature` holding an `Int64List` (packed)."""
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    inner = _field(1, _varints(array)) if array.size else b""
    return _field(3, inner)


def float_feature(values: Sequence[float] | np.ndarray) -> bytes:
    """Encode a `Feature` holding a `FloatList` (packed little-endian float32)."""
    array = np.asarray(values, dtype="<f4").reshape(-1)
    inner = _field(1, array.tobytes()) if array.size else b""
    return _field(2, inner)


def bytes_feature(values: Sequence[bytes | str]) -> bytes:
    """Encode a `Feature` holding a `BytesList`; `str` values are encoded as UTF-8."""
    inner = b"".join(_field(1, v.encode("utf-8") if isinstance(v, str) else bytes(v)) for v in values)
    return _field(1, inner)


# Encoded `key` fields of map entries by feature name, filled as names occur.
_key_fields: dict[str, bytes] = {}


def _key_field(name: str) -> bytes:
    """Return the encoded `key` field of the map entry of feature `name`."""
    field = _key_fields.get(name)
    if field is None:
        field = _field(1, name.encode("utf-8"))
        if len(_key_fields) < 1024:
            _key_fields[name] = field
    return field


def encode_example(features: Mapping[str, bytes]) -> bytes:
    """Serialize a `tf.train.Example` from name -> encoded `Feature` (see the *_feature functions)."""
    entries = b"".join([_field(1, _key_field(name) + _field(2, features[name])) for name in sorted(features)])
    return _field(1, entries)


# ---- the two record kinds --------------------------------------------------------------------

def pretrain_example(input_ids: np.ndarray, segment_ids: np.ndarray, sbp_label: int) -> bytes:
    """Serialize a pre-training example: `[CLS] A [SEP] B [SEP]`, segments 1/2, SBP label 0/1."""
    if len(input_ids) != len(segment_ids):
        raise ValueError(f"input_ids has {len(input_ids)} ids but segment_ids has {len(segment_ids)}; "
                         "both must describe the same tokens")
    return encode_example({
        "input_ids": int64_feature(input_ids),
        "segment_ids": int64_feature(segment_ids),
        "sbp_label": _int64_scalar_feature(sbp_label),
    })


def _ones_feature(count: int) -> bytes:
    """Encode an `Int64List` feature of `count` ones; equal to `int64_feature(np.ones(count))`."""
    return _field(3, _field(1, b"\x01" * count) if count else b"")


def finetune_example(input_ids: np.ndarray, label: int, source: str, session: str,
                     packet_index: int) -> bytes:
    """Serialize a fine-tuning example; `packet_index` is -1 for flow-level examples."""
    return encode_example({
        "input_ids": int64_feature(input_ids),
        "segment_ids": _ones_feature(len(input_ids)),
        "label": _int64_scalar_feature(label),
        "source": _bytes_scalar_feature(source),
        "session": _bytes_scalar_feature(session),
        "packet_index": _int64_scalar_feature(packet_index),
    })


# ---- parsing specs (TensorFlow imported lazily) ----------------------------------------------

def pretrain_feature_spec() -> dict:
    """Return the `tf.io.parse_example` spec of pre-training records."""
    import tensorflow as tf

    return {
        "input_ids": tf.io.VarLenFeature(tf.int64),
        "segment_ids": tf.io.VarLenFeature(tf.int64),
        "sbp_label": tf.io.FixedLenFeature([], tf.int64),
    }


def finetune_feature_spec() -> dict:
    """Return the `tf.io.parse_example` spec of fine-tuning records."""
    import tensorflow as tf

    return {
        "input_ids": tf.io.VarLenFeature(tf.int64),
        "segment_ids": tf.io.VarLenFeature(tf.int64),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "source": tf.io.FixedLenFeature([], tf.string),
        "session": tf.io.FixedLenFeature([], tf.string),
        "packet_index": tf.io.FixedLenFeature([], tf.int64),
    }


# ---- TFRecord framing ------------------------------------------------------------------------

def masked_crc32c(data: bytes) -> int:
    """Return TFRecord's masked CRC-32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """Frame one record for a TFRecord file (no compression)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def write_tfrecords(stream: BinaryIO, records: Iterable[bytes]) -> int:
    """Write `records` to an open binary stream as TFRecords; return how many were written."""
    count = 0
    for data in records:
        stream.write(frame_record(data))
        count += 1
    return count


def read_tfrecords(stream: BinaryIO) -> Iterator[bytes]:
    """Read the records of an uncompressed TFRecord stream, checking both CRCs of each."""
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise ValueError(f"truncated TFRecord header ({len(header)} of 12 bytes); the file is damaged")
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            raise ValueError(f"TFRecord length CRC mismatch (length field {length}); the file is damaged")
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            raise ValueError(f"truncated TFRecord: expected {length} data bytes; the file is damaged")
        if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            raise ValueError("TFRecord data CRC mismatch; the file is damaged")
        yield data
