"""Tests of the pre-training input: masking statistics, per-host files, batches, cursor resume."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from etbert_jax import data
from pretrain_shards import make_shards

VOCAB_SIZE = 65_541
SEQ_LEN = 128


def _random_batch(rng, batch=64, seq_len=SEQ_LEN):
    """[CLS] A [SEP] B [SEP] rows of random lengths with real-vocabulary ids and zero padding."""
    ids = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        length = int(rng.integers(20, seq_len + 1))
        ids[row, :length] = rng.integers(5, VOCAB_SIZE, length)
        split = int(rng.integers(3, length - 2))
        ids[row, 0] = 2
        ids[row, split] = 1
        ids[row, length - 1] = 1
    return ids


def _spec(masking, max_span=3, max_predictions=24):
    return data.MaskingSpec(mask_prob=0.15, masking=masking, max_span=max_span,
                            max_predictions=max_predictions, vocab_size=VOCAB_SIZE)


def _runs(flags):
    """Lengths of runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[0::2]


@pytest.fixture(scope="module")
def shards_dir(sample_captures, tmp_path_factory):
    return make_shards(sample_captures, tmp_path_factory.mktemp("shards"), num_shards=4, count=160)


@pytest.mark.parametrize("masking", ["token", "span"])
def test_masking_rate_and_split(masking):
    rng = np.random.default_rng(0)
    ids = np.concatenate([_random_batch(rng) for _ in range(8)])
    out = data.mask_tokens(ids, _spec(masking), np.random.default_rng(1))

    eligible = ids >= 5
    weights = out["mbm_weights"]
    rows = np.arange(ids.shape[0])[:, None]
    positions = out["masked_positions"]
    chosen_eligible = eligible[rows, positions][weights > 0]
    assert chosen_eligible.all(), "a special token or padding was chosen"

    rate = weights.sum() / eligible.sum()
    assert 0.13 < rate < 0.17

    targets = out["mbm_targets"][weights > 0]
    assert (targets == ids[rows, positions][weights > 0]).all()

    new_ids = out["input_ids"][rows, positions][weights > 0]
    mask_share = np.mean(new_ids == 4)
    unchanged_share = np.mean(new_ids == targets)
    random_share = 1.0 - mask_share - unchanged_share
    assert 0.77 < mask_share < 0.83
    assert 0.08 < unchanged_share < 0.12
    assert 0.08 < random_share < 0.12
    assert (out["input_ids"][~eligible] == ids[~eligible]).all(), "special tokens or padding were changed"


def test_masking_never_touches_unchosen_positions():
    rng = np.random.default_rng(3)
    ids = _random_batch(rng)
    out = data.mask_tokens(ids, _spec("span"), np.random.default_rng(4))
    chosen = np.zeros_like(ids, dtype=bool)
    rows = np.arange(ids.shape[0])[:, None]
    chosen[np.broadcast_to(rows, out["masked_positions"].shape)[out["mbm_weights"] > 0],
           out["masked_positions"][out["mbm_weights"] > 0]] = True
    assert (out["input_ids"][~chosen] == ids[~chosen]).all()


def test_span_masking_is_contiguous():
    rng = np.random.default_rng(5)
    ids = np.concatenate([_random_batch(rng) for _ in range(4)])
    run_lengths = {}
    for masking in ("token", "span"):
        out = data.mask_tokens(ids, _spec(masking, max_span=4), np.random.default_rng(6))
        lengths = []
        for row in range(ids.shape[0]):
            flags = np.zeros(SEQ_LEN, bool)
            flags[out["masked_positions"][row][out["mbm_weights"][row] > 0]] = True
            lengths.extend(_runs(flags))
        run_lengths[masking] = np.mean(lengths)
    assert run_lengths["span"] > 2.0
    assert run_lengths["token"] < 1.4


def test_span_never_crosses_separator():
    ids = np.full((1, 16), 7, np.int32)
    ids[0, 0], ids[0, 8], ids[0, 15] = 2, 1, 1
    for seed in range(50):
        out = data.mask_tokens(ids, _spec("span", max_span=6, max_predictions=8), np.random.default_rng(seed))
        positions = out["masked_positions"][0][out["mbm_weights"][0] > 0]
        assert not np.isin(positions, [0, 8, 15]).any()


def test_masked_slots_capped_and_padded():
    rng = np.random.default_rng(7)
    ids = _random_batch(rng)
    out = data.mask_tokens(ids, _spec("token", max_predictions=4), np.random.default_rng(8))
    assert out["masked_positions"].shape == (64, 4)
    assert out["mbm_weights"].sum(axis=1).max() <= 4
    short = np.zeros((1, SEQ_LEN), np.int32)
    short[0, :6] = [2, 9, 1, 10, 11, 1]
    out = data.mask_tokens(short, _spec("token"), np.random.default_rng(9))
    assert out["mbm_weights"].sum() == 1
    assert (out["masked_positions"][0][1:] == 0).all()
    assert (out["mbm_targets"][0][1:] == 0).all()


def test_files_for_process_split():
    files = [f"f{i}" for i in range(8)]
    shares = [data.files_for_process(files, i, 4) for i in range(4)]
    assert shares[1] == ["f1", "f5"]
    assert sorted(sum(shares, [])) == sorted(files)


def test_files_for_process_divisibility_error():
    with pytest.raises(ValueError, match="6 shard files cannot be split evenly over 4 processes"):
        data.files_for_process([f"f{i}" for i in range(6)], 0, 4)


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_manifest(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        data.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "pretrain", "shards": []}))
    with pytest.raises(ValueError, match="lists no shards"):
        data.list_shards(tmp_path)


def _make_input(shards_dir, cursor=data.InputCursor(), process_index=0, process_count=1, batch=8):
    files = data.list_shards(shards_dir)
    return data.PretrainInput(files, seq_len=SEQ_LEN, local_batch_size=batch, shuffle_buffer=64, seed=3,
                              masking=_spec("span"), process_index=process_index, process_count=process_count,
                              cursor=cursor)


def test_batches_have_fixed_shapes(shards_dir):
    batch = _make_input(shards_dir).next_batch(step=0)
    assert batch["input_ids"].shape == (8, SEQ_LEN)
    assert batch["input_ids"].dtype == np.int32
    assert batch["segment_ids"].shape == (8, SEQ_LEN)
    assert batch["masked_positions"].shape == (8, 24)
    assert batch["mbm_weights"].dtype == np.float32
    assert batch["sbp_labels"].shape == (8,)
    assert set(np.unique(batch["sbp_labels"])) <= {0, 1}
    # Padding lines up: segment 0 exactly where the original ids were padding.
    assert ((batch["segment_ids"] == 0) == (batch["input_ids"] == 0)).all()
    assert (batch["input_ids"][:, 0] == 2).all()


def test_cursor_resume_continues_exactly(shards_dir):
    straight = _make_input(shards_dir)
    # 160 examples over 1 process, batch 8: 20 batches per epoch, so 26 steps cross an epoch.
    expected = [straight.next_batch(step) for step in range(26)]
    assert straight.cursor == data.InputCursor(epoch=1, batches=6)

    first = _make_input(shards_dir)
    for step in range(17):
        first.next_batch(step)
    saved = json.loads(json.dumps(data.cursor_to_json([first.cursor], seed=3)))
    resumed = _make_input(shards_dir, cursor=data.cursor_from_json(saved, 0, 1))
    for step in range(17, 26):
        batch = resumed.next_batch(step)
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected[step][key], err_msg=f"{key} at step {step}")


def test_epochs_differ_in_order(shards_dir):
    source = _make_input(shards_dir)
    epoch0 = [source.next_batch(step)["sbp_labels"] for step in range(20)]
    epoch1 = [source.next_batch(step)["sbp_labels"] for step in range(20, 40)]
    assert not all((a == b).all() for a, b in zip(epoch0, epoch1))


def _unmasked_rows(batch):
    ids = batch["input_ids"].copy()
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], batch["masked_positions"].shape)
    real = batch["mbm_weights"] > 0
    ids[rows[real], batch["masked_positions"][real]] = batch["mbm_targets"][real]
    return {row.tobytes() for row in ids}


def _file_rows(files):
    import tensorflow as tf

    rows = set()
    for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator():
        example = tf.train.Example.FromString(serialized)
        ids = np.zeros(SEQ_LEN, np.int32)
        values = example.features.feature["input_ids"].int64_list.value
        ids[: len(values)] = values
        rows.add(ids.tobytes())
    return rows


def test_processes_read_own_files(shards_dir):
    files = data.list_shards(shards_dir)
    for process in range(2):
        source = _make_input(shards_dir, process_index=process, process_count=2)
        seen = set()
        for step in range(10):
            seen |= _unmasked_rows(source.next_batch(step))
        own = _file_rows(files[process::2])
        other = _file_rows(files[1 - process::2])
        assert seen <= own
        assert len(seen - other) > 0.8 * len(seen)


def test_num_epochs_stops(shards_dir):
    files = data.list_shards(shards_dir)
    source = data.PretrainInput(files, seq_len=SEQ_LEN, local_batch_size=32, shuffle_buffer=8, seed=0,
                                masking=_spec("token"), num_epochs=1)
    count = 0
    with pytest.raises(StopIteration):
        while True:
            source.next_batch(count)
            count += 1
    assert count == 5


def test_global_batch_on_mesh(shards_dir):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    local = _make_input(shards_dir).next_batch(0)
    batch = data.make_global_batch(local, sharding)
    assert batch["input_ids"].shape == (8, SEQ_LEN)
    assert batch["input_ids"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["mbm_targets"]), local["mbm_targets"])
