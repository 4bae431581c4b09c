"""Tests for etbert_jax.records: hand-written Example bytes against TensorFlow's own parser."""

import io

import numpy as np
import pytest
import tensorflow as tf

from etbert_jax import records


def random_int64s(rng, size):
    """Mix small ids, large values and negatives, so every varint length occurs."""
    choice = rng.integers(0, 4, size=size)
    small = rng.integers(0, 70000, size=size)
    large = rng.integers(-(2**63), 2**63 - 1, size=size, dtype=np.int64)
    tiny = rng.integers(-3, 200, size=size)
    edges = rng.choice(np.array([0, 127, 128, 16383, 16384, -1, 2**63 - 1, -(2**63)], dtype=np.int64), size=size)
    return np.where(choice == 0, small, np.where(choice == 1, large, np.where(choice == 2, tiny, edges)))


def test_varints_match_scalar_encoder():
    rng = np.random.default_rng(0)
    values = random_int64s(rng, 2000)
    expected = b"".join(records._varint(int(v)) for v in values)
    assert records._varints(values) == expected
    assert records._varint(300) == b"\xac\x02"
    assert len(records._varint(-1)) == 10


@pytest.mark.parametrize("seed", range(40))
def test_random_examples_parse_in_tf(seed):
    rng = np.random.default_rng(seed)
    ints = random_int64s(rng, int(rng.integers(0, 300)))
    floats = rng.normal(size=int(rng.integers(0, 20))).astype(np.float32)
    blobs = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8))
             for _ in range(int(rng.integers(0, 5)))]
    data = records.encode_example({
        "ints": records.int64_feature(ints),
        "floats": records.float_feature(floats),
        "blobs": records.bytes_feature(blobs),
        "text": records.bytes_feature(["héllo"]),
    })

    parsed = tf.train.Example.FromString(data)
    feature = parsed.features.feature
    assert list(feature["ints"].int64_list.value) == ints.tolist()
    assert np.array_equal(np.asarray(feature["floats"].float_list.value, dtype=np.float32), floats)
    assert list(feature["blobs"].bytes_list.value) == blobs
    assert list(feature["text"].bytes_list.value) == ["héllo".encode()]


def test_encoding_is_deterministic():
    first = records.encode_example({"b": records.int64_feature([1]), "a": records.int64_feature([2])})
    second = records.encode_example({"a": records.int64_feature([2]), "b": records.int64_feature([1])})
    assert first == second


def test_pretrain_example_with_spec():
    input_ids = np.array([2, 10, 11, 1, 12, 13, 14, 1])
    segment_ids = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    data = records.pretrain_example(input_ids, segment_ids, 1)
    parsed = tf.io.parse_single_example(data, records.pretrain_feature_spec())
    assert tf.sparse.to_dense(parsed["input_ids"]).numpy().tolist() == input_ids.tolist()
    assert tf.sparse.to_dense(parsed["segment_ids"]).numpy().tolist() == segment_ids.tolist()
    assert int(parsed["sbp_label"]) == 1


def test_pretrain_example_length_mismatch():
    with pytest.raises(ValueError, match="segment_ids"):
        records.pretrain_example(np.array([1, 2]), np.array([1]), 0)


def test_finetune_example_with_spec():
    input_ids = np.arange(2, 40)
    data = records.finetune_example(input_ids, 3, "tls/a.pcap", "6 10.0.0.1:5000>10.0.0.2:443", -1)
    parsed = tf.io.parse_single_example(data, records.finetune_feature_spec())
    assert tf.sparse.to_dense(parsed["input_ids"]).numpy().tolist() == input_ids.tolist()
    assert tf.sparse.to_dense(parsed["segment_ids"]).numpy().tolist() == [1] * len(input_ids)
    assert int(parsed["label"]) == 3
    assert parsed["source"].numpy() == b"tls/a.pcap"
    assert parsed["session"].numpy() == b"6 10.0.0.1:5000>10.0.0.2:443"
    assert int(parsed["packet_index"]) == -1


def test_empty_lists_parse():
    data = records.encode_example({"ids": records.int64_feature([]), "names": records.bytes_feature([])})
    parsed = tf.train.Example.FromString(data)
    assert list(parsed.features.feature["ids"].int64_list.value) == []
    assert parsed.features.feature["ids"].HasField("int64_list")
    assert parsed.features.feature["names"].HasField("bytes_list")


def test_tfrecord_file_read_by_tf_data(tmp_path):
    rng = np.random.default_rng(7)
    payloads = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 500)), dtype=np.uint8))
                for _ in range(50)]
    path = tmp_path / "x.tfrecord"
    with open(path, "wb") as handle:
        assert records.write_tfrecords(handle, payloads) == 50
    read_back = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    assert read_back == payloads


def test_reader_reads_tf_written_file(tmp_path):
    path = str(tmp_path / "tf.tfrecord")
    payloads = [b"", b"a", b"x" * 1000]
    with tf.io.TFRecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)
    with open(path, "rb") as handle:
        assert list(records.read_tfrecords(handle)) == payloads


def test_reader_detects_damage():
    framed = bytearray(records.frame_record(b"hello world"))
    framed[14] ^= 0xFF
    with pytest.raises(ValueError, match="CRC"):
        list(records.read_tfrecords(io.BytesIO(bytes(framed))))
    with pytest.raises(ValueError, match="truncated"):
        list(records.read_tfrecords(io.BytesIO(records.frame_record(b"hello")[:-3])))


def reference_varints(values):
    """Straightforward scalar encoder, the reference for both paths of `records._varints`."""
    return b"".join(records._varint(int(v)) for v in np.asarray(values).reshape(-1))


@pytest.mark.parametrize("seed", range(20))
def test_varints_table_path_matches_reference(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(0, 600))
    # Only values the table covers, edges included, so the whole array takes the table path.
    small = rng.integers(0, 1 << 17, size=size)
    edges = rng.choice(np.array([0, 1, 127, 128, 16383, 16384, (1 << 17) - 1]), size=size)
    values = np.where(rng.integers(0, 2, size=size) == 0, small, edges)
    assert records._varints(values) == reference_varints(values)
    assert records._varints(values) == records._varints_numpy(values)
    # Strided and two-dimensional views take the same path.
    assert records._varints(values[::3]) == reference_varints(values[::3])
    assert records._varints(values[: size // 2 * 2].reshape(-1, 2)) == reference_varints(values[: size // 2 * 2])
    # One value past either end of the table sends the array to the numpy path; the bytes stay equal.
    for outside in (-1, 1 << 17, 2**63 - 1, -(2**63)):
        mixed = np.append(values, outside)
        assert records._varints(mixed) == reference_varints(mixed)


@pytest.mark.parametrize("count", [0, 1, 2, 127, 128, 129, 512, 20000])
def test_ones_feature_matches_int64_feature(count):
    assert records._ones_feature(count) == records.int64_feature(np.ones(count, dtype=np.int64))


def test_finetune_example_matches_generic_encoding():
    rng = np.random.default_rng(7)
    for _ in range(20):
        ids = rng.integers(0, 65541, size=int(rng.integers(0, 520)))
        expected = records.encode_example({
            "input_ids": records.int64_feature(ids),
            "segment_ids": records.int64_feature(np.ones(len(ids), dtype=np.int64)),
            "label": records.int64_feature([3]),
            "source": records.bytes_feature(["a.pcap"]),
            "session": records.bytes_feature(["tcp 1.2.3.4:5>6.7.8.9:10"]),
            "packet_index": records.int64_feature([-1]),
        })
        assert records.finetune_example(ids, 3, "a.pcap", "tcp 1.2.3.4:5>6.7.8.9:10", -1) == expected


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16384, 1 << 17, 2**63 - 1, -1, -128, -(2**63), True, np.int64(-5)])
def test_scalar_features_match_list_features(value):
    assert records._int64_scalar_feature(value) == records.int64_feature([value])
    assert records._bytes_scalar_feature(str(value)) == records.bytes_feature([str(value)])
    assert records._bytes_scalar_feature(str(value).encode()) == records.bytes_feature([str(value).encode()])


def test_int64_scalar_feature_rejects_out_of_range():
    with pytest.raises(OverflowError):
        records._int64_scalar_feature(2**63)


def test_field_matches_scalar_varints():
    for length in (0, 1, 127, 128, 300, 20000):
        payload = b"x" * length
        assert records._field(2, payload) == records._varint(18) + records._varint(length) + payload
        assert records._field(15, payload) == records._varint(122) + records._varint(length) + payload
        assert records._field(16, payload) == records._varint(130) + records._varint(length) + payload


def test_pretrain_example_matches_generic_encoding():
    ids = np.array([2, 10, 70000, 1, 12, 1])
    segments = np.array([1, 1, 1, 2, 2, 2])
    expected = records.encode_example({
        "input_ids": records.int64_feature(ids),
        "segment_ids": records.int64_feature(segments),
        "sbp_label": records.int64_feature([1]),
    })
    assert records.pretrain_example(ids, segments, 1) == expected
