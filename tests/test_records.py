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


# ---- batched encoders ------------------------------------------------------------------------

def random_text(rng, size):
    """Return a string of `size` characters mixing ASCII, two-, three- and four-byte UTF-8."""
    alphabet = np.array(list("abc:>. 019") + ["é", "ß", "→", "流", "😀"])
    return "".join(rng.choice(alphabet, size=size))


def random_string_list(rng, count):
    """Return strings for a batch: empty, short, past 127 bytes, one long, one repeated, one `bytes` value."""
    sizes = rng.choice(np.array([0, 1, 20, 40, 130, 300]), size=count)
    values = [random_text(rng, int(size)) for size in sizes]
    if count:
        # 12000 characters are 12000 to 48000 bytes, so the length varints take two or three bytes.
        values[int(rng.integers(0, count))] = random_text(rng, 12000)
        values[int(rng.integers(0, count))] = b"raw\xff bytes"
        values[int(rng.integers(0, count))] = values[0]
    return values


def random_batch(rng, count, max_len):
    """Return padded ids and lengths: every varint size, zero-length and full rows, junk padding."""
    ids = random_int64s(rng, (count, max_len))
    lengths = rng.integers(0, max_len + 1, size=count)
    if count >= 2:
        lengths[0], lengths[-1] = 0, max_len
    return ids, lengths


@pytest.mark.parametrize("seed", range(12))
def test_finetune_examples_match_per_example(seed):
    rng = np.random.default_rng(seed)
    count, max_len = int(rng.integers(0, 40)), int(rng.integers(0, 300))
    ids, lengths = random_batch(rng, count, max_len)
    labels, packet_indices = random_int64s(rng, count), random_int64s(rng, count)
    sources, sessions = random_string_list(rng, count), random_string_list(rng, count)

    got = records.finetune_examples(ids, lengths, labels, sources, sessions, packet_indices)

    assert len(got) == count
    for row in range(count):
        expected = records.finetune_example(ids[row, :lengths[row]], labels[row], sources[row], sessions[row],
                                            packet_indices[row])
        assert got[row] == expected, f"row {row} of seed {seed}"


@pytest.mark.parametrize("seed", range(4))
def test_finetune_examples_take_flat_ids(seed):
    # One flat array of every example's ids, back to back, gives the same bytes as padded rows.
    rng = np.random.default_rng(200 + seed)
    count, max_len = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    ids, lengths = random_batch(rng, count, max_len)
    flat = np.concatenate([ids[row, :lengths[row]] for row in range(count)])
    labels, packet_indices = random_int64s(rng, count), random_int64s(rng, count)
    sources, sessions = random_string_list(rng, count), random_string_list(rng, count)

    padded = records.finetune_examples(ids, lengths, labels, sources, sessions, packet_indices)
    assert records.finetune_examples(flat, lengths, labels, sources, sessions, packet_indices) == padded


def test_finetune_examples_reject_flat_ids_of_other_total():
    with pytest.raises(ValueError, match="sum to that"):
        records.finetune_examples(np.arange(5), np.array([2, 2]), [0, 0], ["a", "b"], ["s", "t"], [0, 1])


@pytest.mark.parametrize("seed", range(12))
def test_pretrain_examples_match_per_example(seed):
    rng = np.random.default_rng(100 + seed)
    count, max_len = int(rng.integers(0, 40)), int(rng.integers(0, 300))
    ids, lengths = random_batch(rng, count, max_len)
    segment_ids = random_int64s(rng, (count, max_len))
    labels = random_int64s(rng, count)

    got = records.pretrain_examples(ids, lengths, segment_ids, labels)

    assert len(got) == count
    for row in range(count):
        expected = records.pretrain_example(ids[row, :lengths[row]], segment_ids[row, :lengths[row]], labels[row])
        assert got[row] == expected, f"row {row} of seed {seed}"


def test_batches_of_default_vocabulary_ids():
    # The common case: ids below 65541, segments 1 and 2, non-negative labels, one source per batch.
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 65541, size=(300, 128))
    lengths = rng.integers(2, 129, size=300)
    segment_ids = np.where(np.arange(128) < lengths[:, None] // 2, 1, 2)
    labels = rng.integers(0, 2, size=300)

    pretrain = records.pretrain_examples(ids, lengths, segment_ids, labels)
    finetune = records.finetune_examples(ids, lengths, labels, ["tls/a.pcap"] * 300,
                                         [f"tcp 10.0.0.1:{port}>10.0.0.2:443" for port in range(300)],
                                         np.full(300, -1))

    for row in range(300):
        valid = slice(0, lengths[row])
        assert pretrain[row] == records.pretrain_example(ids[row, valid], segment_ids[row, valid], labels[row])
        assert finetune[row] == records.finetune_example(ids[row, valid], labels[row], "tls/a.pcap",
                                                         f"tcp 10.0.0.1:{row}>10.0.0.2:443", -1)


def test_batches_with_long_rows():
    # 20000 three-byte ids make a 60000-byte payload, whose length takes a three-byte varint.
    ids = np.full((2, 20000), 70000, dtype=np.int64)
    lengths = np.array([20000, 19999])
    segments = np.ones_like(ids)

    finetune = records.finetune_examples(ids, lengths, [1, 2], ["s" * 200, "t"], ["u", "v" * 20000], [0, 1])
    pretrain = records.pretrain_examples(ids, lengths, segments, [0, 1])

    for row in range(2):
        valid = slice(0, lengths[row])
        assert finetune[row] == records.finetune_example(ids[row, valid], row + 1, ["s" * 200, "t"][row],
                                                         ["u", "v" * 20000][row], row)
        assert pretrain[row] == records.pretrain_example(ids[row, valid], segments[row, valid], row)


def test_batches_accept_views_and_other_dtypes():
    rng = np.random.default_rng(9)
    wide = rng.integers(0, 1 << 17, size=(8, 40)).astype(np.int32)
    ids = wide[::2, ::2]  # strided int32 view, converted to contiguous int64
    lengths = [20, 0, 5, 19]
    labels = [True, 3, np.int64(-7), 2**63 - 1]

    finetune = records.finetune_examples(ids, lengths, labels, ["a", "b", "c", "d"], ["e", "f", "g", "h"],
                                         (-1, 0, 1, 2))
    pretrain = records.pretrain_examples(ids, lengths, ids % 3, labels)

    for row in range(4):
        valid = ids[row, :lengths[row]]
        assert finetune[row] == records.finetune_example(valid, labels[row], "abcd"[row], "efgh"[row], row - 1)
        assert pretrain[row] == records.pretrain_example(valid, valid % 3, labels[row])


def test_empty_batches():
    empty = np.zeros((0, 7), dtype=np.int64)
    assert records.finetune_examples(empty, np.zeros(0), [], [], [], []) == []
    assert records.pretrain_examples(empty, np.zeros(0), empty, []) == []
    no_columns = np.zeros((3, 0), dtype=np.int64)
    assert records.pretrain_examples(no_columns, [0, 0, 0], no_columns, [0, 1, 2]) == [
        records.pretrain_example(np.zeros(0), np.zeros(0), label) for label in range(3)]


@pytest.mark.parametrize("lengths", [[1, 6], [-1, 0]])
def test_batches_reject_lengths_outside_rows(lengths):
    ids = np.zeros((2, 5), dtype=np.int64)
    with pytest.raises(ValueError, match=r"lengths\[\d\]"):
        records.finetune_examples(ids, lengths, [0, 0], ["a", "b"], ["c", "d"], [0, 0])
    with pytest.raises(ValueError, match=r"lengths\[\d\]"):
        records.pretrain_examples(ids, lengths, ids, [0, 0])


def test_batches_reject_inconsistent_shapes():
    ids = np.zeros((2, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="2-D"):
        records.pretrain_examples(np.zeros(5), [5], np.zeros(5), [0])
    with pytest.raises(ValueError, match="lengths"):
        records.pretrain_examples(ids, [1, 2, 3], ids, [0, 0])
    with pytest.raises(ValueError, match="segment_ids"):
        records.pretrain_examples(ids, [1, 2], ids[:, :4], [0, 0])
    with pytest.raises(ValueError, match="sbp_labels"):
        records.pretrain_examples(ids, [1, 2], ids, [0])
    with pytest.raises(ValueError, match="sources"):
        records.finetune_examples(ids, [1, 2], [0, 0], ["a"], ["c", "d"], [0, 0])
    with pytest.raises(ValueError, match="packet_indices"):
        records.finetune_examples(ids, [1, 2], [0, 0], ["a", "b"], ["c", "d"], [0, 0, 0])


def test_batches_reject_labels_outside_int64():
    ids = np.zeros((1, 1), dtype=np.int64)
    with pytest.raises(OverflowError):
        records.finetune_examples(ids, [1], [2**63], ["a"], ["b"], [0])


def test_finetune_batch_parses_in_tf():
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 65541, size=(16, 60))
    lengths = rng.integers(0, 61, size=16)
    labels = rng.integers(-1, 5, size=16)
    sources = [f"captures/{random_text(rng, 3)}.pcap" for _ in range(16)]
    sessions = [random_text(rng, 150) for _ in range(16)]
    packet_indices = rng.integers(-1, 100, size=16)

    batch = records.finetune_examples(ids, lengths, labels, sources, sessions, packet_indices)
    parsed = tf.io.parse_example(batch, records.finetune_feature_spec())

    for name in ("input_ids", "segment_ids"):
        rows = tf.RaggedTensor.from_sparse(parsed[name]).to_list()
        assert [len(row) for row in rows] == lengths.tolist()
        for row in range(16):
            expected = ids[row, :lengths[row]] if name == "input_ids" else np.ones(lengths[row])
            assert rows[row] == expected.tolist()
    assert parsed["label"].numpy().tolist() == labels.tolist()
    assert parsed["packet_index"].numpy().tolist() == packet_indices.tolist()
    assert [value.decode() for value in parsed["source"].numpy()] == sources
    assert [value.decode() for value in parsed["session"].numpy()] == sessions


def test_pretrain_batch_parses_in_tf():
    rng = np.random.default_rng(12)
    ids = rng.integers(0, 65541, size=(16, 130))
    lengths = rng.integers(3, 131, size=16)
    segment_ids = np.where(np.arange(130) < lengths[:, None] // 2, 1, 2)
    labels = rng.integers(0, 2, size=16)

    parsed = tf.io.parse_example(records.pretrain_examples(ids, lengths, segment_ids, labels),
                                 records.pretrain_feature_spec())

    input_rows = tf.RaggedTensor.from_sparse(parsed["input_ids"]).to_list()
    segment_rows = tf.RaggedTensor.from_sparse(parsed["segment_ids"]).to_list()
    for row in range(16):
        assert input_rows[row] == ids[row, :lengths[row]].tolist()
        assert segment_rows[row] == segment_ids[row, :lengths[row]].tolist()
    assert parsed["sbp_label"].numpy().tolist() == labels.tolist()
