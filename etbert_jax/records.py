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

`finetune_examples` and `pretrain_examples` serialize whole batches of padded id arrays with numba
kernels. Their output equals that of the per-example functions byte for byte.

The feature specs for parsing (`pretrain_feature_spec`, `finetune_feature_spec`) import
TensorFlow lazily, only when they are called. The record layout is fixed in docs/architecture.md.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO

import google_crc32c
import numba
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


# ---- batches of examples (numba kernels) -----------------------------------------------------
#
# The kernels write the same wire format as `encode_example`: map entries in sorted key order, every
# field number below 16 (one-byte tags), negative int64 values as ten-byte varints. Each kernel makes
# two passes over the batch: the first sums the size of every example, the second writes all examples
# into one buffer.
#
# Numba compiles a separate version of a jitted function for every constant argument value it is
# called with. The helpers below therefore take only computed values (positions, sizes, loop
# indices), which keeps the first compilation of both kernels near 5 s on a 2-core machine instead
# of 15 s. `cache=True` stores the machine code next to this file in __pycache__ (or in numba's user
# cache folder when that one is read-only), and later processes load it in about 0.5 s.
# NOTE: the first batch call in a fresh environment still pays that compilation.

# Tags of the fields the kernels write: field 1 or 2 (length-delimited) and field 3 (`int64_list`).
_TAG_FIELD_1 = (1 << 3) | _LENGTH_DELIMITED
_TAG_FIELD_2 = (2 << 3) | _LENGTH_DELIMITED
_TAG_INT64_LIST = (3 << 3) | _LENGTH_DELIMITED

# Spare bytes at the end of each kernel buffer, for the junk bytes that `_write_varint` stores.
_WRITE_SLACK = 2

# Feature names in the order that `encode_example` writes them (sorted). The kernels write the
# features by their index in these tuples.
_PRETRAIN_KEYS = ("input_ids", "sbp_label", "segment_ids")
_FINETUNE_KEYS = ("input_ids", "label", "packet_index", "segment_ids", "session", "source")


def _key_table(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return the encoded `key` fields of `names` as one uint8 array and its start offsets."""
    fields = [_key_field(name) for name in names]
    offsets = np.zeros(len(fields) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(field) for field in fields])
    return np.frombuffer(b"".join(fields), dtype=np.uint8), offsets


@numba.njit(cache=True)
def _varint_size(value: int) -> int:
    """Return the byte length of `value` (an int64) as a varint; negative values take 10 bytes.

    A sum of comparisons has no data-dependent branch, so the compiler can vectorize `_packed_size`.
    """
    size = 1 + 9 * (value < 0)
    for group in range(1, 9):
        size += value >= (1 << (7 * group))
    return size


@numba.njit(cache=True)
def _write_varint(out: np.ndarray, position: int, value: int) -> int:
    """Write `value` (an int64, two's complement when negative) as a varint; return the next position.

    Values in [0, 2**21), which include the token ids of both vocabularies, take a branch-free path
    that always stores three bytes. Only the first one to three of them belong to the varint, and
    the bytes past it are junk. Callers write sequentially, so later writes replace that junk, and
    every buffer is allocated with `_WRITE_SLACK` spare bytes at its end.
    """
    if 0 <= value < (1 << 21):
        out[position] = (value & 0x7F) | ((value >= 0x80) << 7)
        out[position + 1] = ((value >> 7) & 0x7F) | ((value >= 0x4000) << 7)
        out[position + 2] = value >> 14
        return position + 1 + (value >= 0x80) + (value >= 0x4000)

    unsigned = np.uint64(value)
    while unsigned >= np.uint64(0x80):
        out[position] = np.uint8((unsigned & np.uint64(0x7F)) | np.uint64(0x80))
        unsigned >>= np.uint64(7)
        position += 1
    out[position] = np.uint8(unsigned)
    return position + 1


@numba.njit(cache=True)
def _copy_bytes(out: np.ndarray, position: int, data: np.ndarray, start: int, stop: int) -> int:
    """Copy `data[start:stop]` to `out[position:]`; return the next position."""
    for index in range(start, stop):
        out[position] = data[index]
        position += 1
    return position


@numba.njit(cache=True)
def _field_size(payload_size: int) -> int:
    """Return the size of a length-delimited field with a one-byte tag."""
    return 1 + _varint_size(payload_size) + payload_size


@numba.njit(cache=True)
def _packed_size(values: np.ndarray, count: int) -> int:
    """Return the byte length of `values[:count]` as packed varints."""
    size = 0
    for index in range(count):
        size += _varint_size(values[index])
    return size


@numba.njit(cache=True)
def _int64_list_size(payload_size: int, count: int) -> int:
    """Return the size of an `Int64List` of `count` values packed in `payload_size` bytes.

    An empty list is written without its `value` field, as `int64_feature` does.
    """
    return _field_size(payload_size) if count > 0 else 0


@numba.njit(cache=True)
def _int64_value_size(value: int) -> int:
    """Return the size of an `Int64List` of one value."""
    return _field_size(_varint_size(value))


@numba.njit(cache=True)
def _entry_sizes(feature_sizes: np.ndarray, key_offsets: np.ndarray) -> int:
    """Return the size of the map entries of all features; `feature_sizes[k]` belongs to key k."""
    total = 0
    for key in range(feature_sizes.shape[0]):
        key_size = key_offsets[key + 1] - key_offsets[key]
        total += _field_size(key_size + _field_size(feature_sizes[key]))
    return total


@numba.njit(cache=True)
def _write_entry_header(out: np.ndarray, position: int, keys: np.ndarray, key_offsets: np.ndarray, key: int,
                        feature_size: int) -> int:
    """Write a map entry up to its `Feature` payload: entry tag and length, key field, value header."""
    start, stop = key_offsets[key], key_offsets[key + 1]
    out[position] = _TAG_FIELD_1
    position = _write_varint(out, position + 1, stop - start + _field_size(feature_size))
    position = _copy_bytes(out, position, keys, start, stop)
    out[position] = _TAG_FIELD_2
    return _write_varint(out, position + 1, feature_size)


@numba.njit(cache=True)
def _write_int64_list(out: np.ndarray, position: int, values: np.ndarray, count: int, payload_size: int) -> int:
    """Write a `Feature` holding the `Int64List` of `values[:count]` (packed in `payload_size` bytes)."""
    out[position] = _TAG_INT64_LIST
    position = _write_varint(out, position + 1, _int64_list_size(payload_size, count))
    if count > 0:
        out[position] = _TAG_FIELD_1
        position = _write_varint(out, position + 1, payload_size)
        for index in range(count):
            position = _write_varint(out, position, values[index])
    return position


@numba.njit(cache=True)
def _write_ones(out: np.ndarray, position: int, count: int) -> int:
    """Write a `Feature` holding an `Int64List` of `count` ones (one byte each)."""
    out[position] = _TAG_INT64_LIST
    position = _write_varint(out, position + 1, _int64_list_size(count, count))
    if count > 0:
        out[position] = _TAG_FIELD_1
        position = _write_varint(out, position + 1, count)
        for index in range(position, position + count):
            out[index] = 1
        position += count
    return position


@numba.njit(cache=True)
def _write_int64_value(out: np.ndarray, position: int, value: int) -> int:
    """Write a `Feature` holding an `Int64List` of one value."""
    value_size = _varint_size(value)
    out[position] = _TAG_INT64_LIST
    position = _write_varint(out, position + 1, _field_size(value_size))
    out[position] = _TAG_FIELD_1
    position = _write_varint(out, position + 1, value_size)
    return _write_varint(out, position, value)


@numba.njit(cache=True)
def _write_bytes_value(out: np.ndarray, position: int, data: np.ndarray, start: int, stop: int) -> int:
    """Write a `Feature` holding a `BytesList` of one value, `data[start:stop]`."""
    # `bytes_list` and `BytesList.value` are both field 1.
    out[position] = _TAG_FIELD_1
    position = _write_varint(out, position + 1, _field_size(stop - start))
    out[position] = _TAG_FIELD_1
    position = _write_varint(out, position + 1, stop - start)
    return _copy_bytes(out, position, data, start, stop)


@numba.njit(cache=True)
def _check_end(position: int, expected: int) -> None:
    """Raise RuntimeError unless an example ended at the offset that the size pass computed.

    Numba does not check array bounds, so a size mismatch would write past the example.
    """
    if position != expected:
        raise RuntimeError("records kernel: example size differs from the size pass (a bug in records.py)")


@numba.njit(cache=True)
def _finetune_batch(input_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
                    packet_indices: np.ndarray,
                    sources: np.ndarray, source_offsets: np.ndarray, sessions: np.ndarray,
                    session_offsets: np.ndarray, keys: np.ndarray,
                    key_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Serialize a batch of fine-tuning examples into one buffer; return it and the n + 1 example offsets.

    The ids of example i are `input_ids[starts[i]:starts[i] + lengths[i]]` (a flat array). `keys`
    contains the key fields of `_FINETUNE_KEYS` in that order. String i is
    `sources[source_offsets[i]:source_offsets[i + 1]]`, and likewise for sessions.
    """
    count = lengths.shape[0]
    payload_sizes = np.empty(count, dtype=np.int64)
    feature_sizes = np.empty((count, 6), dtype=np.int64)
    entry_sizes = np.empty(count, dtype=np.int64)
    offsets = np.empty(count + 1, dtype=np.int64)
    offsets[0] = 0

    # Pass 1: the size of every feature and example.
    for row in range(count):
        length = lengths[row]
        payload_sizes[row] = _packed_size(input_ids[starts[row]:], length)
        feature_sizes[row, 0] = _field_size(_int64_list_size(payload_sizes[row], length))
        feature_sizes[row, 1] = _field_size(_int64_value_size(labels[row]))
        feature_sizes[row, 2] = _field_size(_int64_value_size(packet_indices[row]))
        feature_sizes[row, 3] = _field_size(_int64_list_size(length, length))
        feature_sizes[row, 4] = _field_size(_field_size(session_offsets[row + 1] - session_offsets[row]))
        feature_sizes[row, 5] = _field_size(_field_size(source_offsets[row + 1] - source_offsets[row]))
        entry_sizes[row] = _entry_sizes(feature_sizes[row], key_offsets)
        offsets[row + 1] = offsets[row] + _field_size(entry_sizes[row])

    # Pass 2: the bytes of every example, its entries in the order of `_FINETUNE_KEYS`.
    out = np.empty(offsets[count] + _WRITE_SLACK, dtype=np.uint8)
    for row in range(count):
        out[offsets[row]] = _TAG_FIELD_1
        position = _write_varint(out, offsets[row] + 1, entry_sizes[row])
        for key in range(6):
            position = _write_entry_header(out, position, keys, key_offsets, key, feature_sizes[row, key])
            if key == 0:
                position = _write_int64_list(out, position, input_ids[starts[row]:], lengths[row],
                                             payload_sizes[row])
            elif key == 1:
                position = _write_int64_value(out, position, labels[row])
            elif key == 2:
                position = _write_int64_value(out, position, packet_indices[row])
            elif key == 3:
                position = _write_ones(out, position, lengths[row])
            elif key == 4:
                position = _write_bytes_value(out, position, sessions, session_offsets[row],
                                              session_offsets[row + 1])
            else:
                position = _write_bytes_value(out, position, sources, source_offsets[row],
                                              source_offsets[row + 1])
        _check_end(position, offsets[row + 1])
    return out[:offsets[count]], offsets


@numba.njit(cache=True)
def _pretrain_batch(input_ids: np.ndarray, segment_ids: np.ndarray, lengths: np.ndarray, sbp_labels: np.ndarray,
                    keys: np.ndarray, key_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Serialize a batch of pre-training examples into one buffer; return it and the n + 1 example offsets.

    `keys` contains the key fields of `_PRETRAIN_KEYS` in that order.
    """
    count = lengths.shape[0]
    id_sizes = np.empty(count, dtype=np.int64)
    segment_sizes = np.empty(count, dtype=np.int64)
    feature_sizes = np.empty((count, 3), dtype=np.int64)
    entry_sizes = np.empty(count, dtype=np.int64)
    offsets = np.empty(count + 1, dtype=np.int64)
    offsets[0] = 0

    # Pass 1: the size of every feature and example.
    for row in range(count):
        length = lengths[row]
        id_sizes[row] = _packed_size(input_ids[row], length)
        segment_sizes[row] = _packed_size(segment_ids[row], length)
        feature_sizes[row, 0] = _field_size(_int64_list_size(id_sizes[row], length))
        feature_sizes[row, 1] = _field_size(_int64_value_size(sbp_labels[row]))
        feature_sizes[row, 2] = _field_size(_int64_list_size(segment_sizes[row], length))
        entry_sizes[row] = _entry_sizes(feature_sizes[row], key_offsets)
        offsets[row + 1] = offsets[row] + _field_size(entry_sizes[row])

    # Pass 2: the bytes of every example, its entries in the order of `_PRETRAIN_KEYS`.
    out = np.empty(offsets[count] + _WRITE_SLACK, dtype=np.uint8)
    for row in range(count):
        out[offsets[row]] = _TAG_FIELD_1
        position = _write_varint(out, offsets[row] + 1, entry_sizes[row])
        for key in range(3):
            position = _write_entry_header(out, position, keys, key_offsets, key, feature_sizes[row, key])
            if key == 0:
                position = _write_int64_list(out, position, input_ids[row], lengths[row], id_sizes[row])
            elif key == 1:
                position = _write_int64_value(out, position, sbp_labels[row])
            else:
                position = _write_int64_list(out, position, segment_ids[row], lengths[row], segment_sizes[row])
        _check_end(position, offsets[row + 1])
    return out[:offsets[count]], offsets


# Key tables of the two record kinds, built at import (a few hundred bytes).
_PRETRAIN_KEY_TABLE = _key_table(_PRETRAIN_KEYS)
_FINETUNE_KEY_TABLE = _key_table(_FINETUNE_KEYS)


def _batch_ids(input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return `input_ids` as a C-contiguous (n, max_len) int64 array and `lengths` as int64.

    Raises ValueError unless `input_ids` is two-dimensional and every length lies in [0, max_len].
    """
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be a 2-D (examples, max_len) array, got shape {ids.shape}")
    counts = np.ascontiguousarray(lengths, dtype=np.int64)
    if counts.shape != (ids.shape[0],):
        raise ValueError(f"lengths must have shape ({ids.shape[0]},) to match input_ids {ids.shape}, "
                         f"got {counts.shape}")
    invalid = np.flatnonzero((counts < 0) | (counts > ids.shape[1]))
    if invalid.size:
        row = int(invalid[0])
        raise ValueError(f"lengths[{row}] is {int(counts[row])}, outside [0, {ids.shape[1]}] "
                         f"(max_len of input_ids); {invalid.size} rows are invalid")
    return ids, counts


def _batch_scalars(values: Sequence[int] | np.ndarray, count: int, name: str) -> np.ndarray:
    """Return one int64 per example; raise ValueError unless there are exactly `count` values."""
    array = np.ascontiguousarray(values, dtype=np.int64)
    if array.shape != (count,):
        raise ValueError(f"{name} must hold one integer per example ({count}), got shape {array.shape}")
    return array


def _batch_strings(values: Sequence[bytes | str], count: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the UTF-8 bytes of all `values` as one uint8 array and the count + 1 start offsets."""
    if len(values) != count:
        raise ValueError(f"{name} must hold one string per example ({count}), got {len(values)}")
    try:
        encoded = list(map(str.encode, values))  # str.encode defaults to UTF-8
    except TypeError:
        encoded = [value.encode("utf-8") if isinstance(value, str) else bytes(value) for value in values]

    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=count), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _split_buffer(buffer: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """Cut the kernel's buffer into one `bytes` object per example."""
    data = buffer.tobytes()
    bounds = offsets.tolist()
    return [data[start:stop] for start, stop in zip(bounds, bounds[1:])]


def finetune_examples(input_ids: np.ndarray, lengths: np.ndarray, labels: Sequence[int] | np.ndarray,
                      sources: Sequence[str], sessions: Sequence[str],
                      packet_indices: Sequence[int] | np.ndarray) -> list[bytes]:
    """Serialize a batch of fine-tuning examples; row i of `input_ids` contains ids in `[:lengths[i]]`.

    Example i equals `finetune_example(input_ids[i, :lengths[i]], labels[i], sources[i], sessions[i],
    packet_indices[i])` byte for byte. Ids past a row's length are ignored. `input_ids` may also be
    one flat array of all examples' ids, one example after the other, which avoids padding examples
    of very different lengths. Raises ValueError on inconsistent shapes or lengths.
    """
    if np.ndim(input_ids) == 1:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        counts = np.ascontiguousarray(lengths, dtype=np.int64)
        if counts.ndim != 1 or (counts < 0).any() or counts.sum() != len(ids):
            raise ValueError(f"flat input_ids hold {len(ids)} ids, but lengths must be >= 0 and sum to that, "
                             f"got shape {counts.shape} and sum {int(counts.sum()) if counts.ndim == 1 else '?'}")
        starts = np.cumsum(counts) - counts
    else:
        rows, counts = _batch_ids(input_ids, lengths)
        ids = rows.reshape(-1)
        starts = np.arange(len(counts), dtype=np.int64) * rows.shape[1]
    count = len(counts)
    label_array = _batch_scalars(labels, count, "labels")
    index_array = _batch_scalars(packet_indices, count, "packet_indices")
    source_data, source_offsets = _batch_strings(sources, count, "sources")
    session_data, session_offsets = _batch_strings(sessions, count, "sessions")

    buffer, offsets = _finetune_batch(ids, starts, counts, label_array, index_array, source_data, source_offsets,
                                      session_data, session_offsets, *_FINETUNE_KEY_TABLE)
    return _split_buffer(buffer, offsets)


def pretrain_examples(input_ids: np.ndarray, lengths: np.ndarray, segment_ids: np.ndarray,
                      sbp_labels: Sequence[int] | np.ndarray) -> list[bytes]:
    """Serialize a batch of pre-training examples; row i contains ids and segments in `[:lengths[i]]`.

    Example i equals `pretrain_example(input_ids[i, :lengths[i]], segment_ids[i, :lengths[i]],
    sbp_labels[i])` byte for byte. Raises ValueError on inconsistent shapes or lengths.
    """
    ids, counts = _batch_ids(input_ids, lengths)
    segments = np.ascontiguousarray(segment_ids, dtype=np.int64)
    if segments.shape != ids.shape:
        raise ValueError(f"segment_ids has shape {segments.shape} but input_ids has {ids.shape}; "
                         "both must describe the same tokens")
    label_array = _batch_scalars(sbp_labels, len(counts), "sbp_labels")

    buffer, offsets = _pretrain_batch(ids, segments, counts, label_array, *_PRETRAIN_KEY_TABLE)
    return _split_buffer(buffer, offsets)


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
