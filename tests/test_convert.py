"""Tests for etbert_jax.convert: BURST halves, SBP pairing, truncation, fine-tuning examples."""

import random
from collections import Counter

import dpkt
import numpy as np
import pytest
import tensorflow as tf

from etbert_jax import convert, records
from etbert_jax.capture import SkipCounter
from etbert_jax.convert import BurstHalves, ConvertSettings
from etbert_jax.tokenizer import Vocab

TLS13 = "tls13/arkime-curl-tls13.pcap"
SSH = "ssh/tcpdump-ssh.pcap"


def frames_of(path):
    with open(path, "rb") as handle:
        return [bytes(frame) for _, frame in dpkt.pcap.Reader(handle)]


def reference_truncate(length_a, length_b, max_total):
    """BERT's truncate_seq_pair as a loop: pop from the longer list, from B on ties."""
    while length_a + length_b > max_total:
        if length_a > length_b:
            length_a -= 1
        else:
            length_b -= 1
    return length_a, length_b


def burst(key, session, a=b"\x01\x02\x03", b=b"\x04\x05\x06"):
    return BurstHalves.of(key=key, session=session, a=a, b=b)


@pytest.mark.parametrize("length", [0, 1, 4, 5, 64, 129])
def test_split_burst_at_ceiling_half(length):
    data = bytes(range(length))
    a, b = convert.split_burst(data)
    assert a + b == data
    assert len(a) == (length + 1) // 2


def test_truncate_pair_matches_loop():
    for length_a in range(0, 40, 3):
        for length_b in range(0, 40, 2):
            for max_total in (0, 1, 7, 30, 125):
                assert convert.truncate_pair(length_a, length_b, max_total) == reference_truncate(
                    length_a, length_b, max_total)


def test_pretrain_instance_layout():
    vocab = Vocab.default()
    ids_a = np.arange(100, 300)
    ids_b = np.arange(500, 540)
    input_ids, segment_ids = convert.pretrain_instance(ids_a, ids_b, vocab, seq_len=128)
    assert len(input_ids) == 128
    assert input_ids[0] == vocab.cls_id
    assert input_ids[-1] == vocab.sep_id
    sep_positions = np.flatnonzero(input_ids == vocab.sep_id).tolist()
    keep_a = 125 - 40
    assert sep_positions == [keep_a + 1, 127]
    assert input_ids[1:keep_a + 1].tolist() == ids_a[:keep_a].tolist()
    assert input_ids[keep_a + 2:-1].tolist() == ids_b.tolist()
    assert segment_ids.tolist() == [1] * (keep_a + 2) + [2] * 41


def test_pair_bucket_negatives_cross_session():
    settings = ConvertSettings(negative_ratio=0.5, seed=3)
    bursts = [burst(f"u{i % 4}#{i:03d}", session=f"s{i % 4}", a=bytes([i, i, i]), b=bytes([i, 1, 2]))
              for i in range(200)]
    counts = Counter()
    pairs = convert.pair_bucket(bursts, bucket=0, settings=settings, counts=counts)
    assert len(pairs) == 200
    owner_of_b = {item.b: item.session for item in bursts}
    for item, b_half, label in pairs:
        if label == 0:
            assert b_half == item.b
        else:
            assert owner_of_b[b_half] != item.session
    assert counts["negatives"] + counts["positives"] == 200
    assert 60 < counts["negatives"] < 140
    again = convert.pair_bucket(list(reversed(bursts)), bucket=0, settings=settings, counts=Counter())
    assert [(p[0].key, p[1], p[2]) for p in again] == [(p[0].key, p[1], p[2]) for p in pairs]


def test_pair_bucket_single_session_has_no_negatives():
    settings = ConvertSettings(negative_ratio=1.0)
    bursts = [burst(f"k{i}", session="only") for i in range(5)]
    counts = Counter()
    pairs = convert.pair_bucket(bursts, bucket=1, settings=settings, counts=counts)
    assert all(label == 0 for _, _, label in pairs)
    assert counts["negatives_unavailable"] == 5


def test_pair_bucket_ratio_zero():
    settings = ConvertSettings(negative_ratio=0.0)
    bursts = [burst(f"k{i}", session=f"s{i}") for i in range(20)]
    pairs = convert.pair_bucket(bursts, bucket=0, settings=settings, counts=Counter())
    assert {label for _, _, label in pairs} == {0}


def reference_pair_bucket(bursts, bucket, settings, counts):
    """The forward search per negative that `pair_bucket` replaced: the reference pairing."""
    ordered = sorted(bursts, key=lambda item: (convert.stable_hash(item.key), item.key))
    rng = random.Random(f"{settings.seed}:pairs:{bucket}")
    pairs = []
    for position, item in enumerate(ordered):
        if rng.random() >= settings.negative_ratio:
            pairs.append((item, item.b, 0))
            counts["positives"] += 1
            continue
        partner = None
        for step in range(1, len(ordered)):
            candidate = ordered[(position + step) % len(ordered)]
            if candidate.session != item.session:
                partner = candidate
                break
        if partner is None:
            pairs.append((item, item.b, 0))
            counts["positives"] += 1
            counts["negatives_unavailable"] += 1
        else:
            pairs.append((item, partner.b, 1))
            counts["negatives"] += 1
    return pairs


@pytest.mark.parametrize("seed", range(30))
def test_pair_bucket_matches_reference(seed):
    rng = random.Random(seed)
    size = rng.choice([0, 1, 2, 3, 10, 50, 300])
    sessions = rng.randint(1, 6)
    # Every third bucket is dominated by one session, with a few BURSTs of others (or none).
    dominant = seed % 3 == 0
    bursts = []
    for index in range(size):
        if dominant and rng.random() < 0.95:
            session = "big"
        else:
            session = f"s{rng.randrange(sessions)}"
        bursts.append(burst(f"{session}#{index:05d}", session=session, b=index.to_bytes(3, "big")))
    settings = ConvertSettings(negative_ratio=rng.choice([0.0, 0.3, 0.5, 1.0]), seed=seed)

    expected_counts, got_counts = Counter(), Counter()
    expected = reference_pair_bucket(bursts, seed, settings, expected_counts)
    got = convert.pair_bucket(bursts, seed, settings, got_counts)
    assert [(a.key, b, label) for a, b, label in got] == [(a.key, b, label) for a, b, label in expected]
    assert got_counts == expected_counts


def test_burst_halves_from_capture(sample_captures):
    settings = ConvertSettings()
    stats, counts = SkipCounter(), Counter()
    path = str(sample_captures / TLS13)
    halves = list(convert.iter_burst_halves([path], [TLS13], TLS13, settings, stats, counts))
    assert halves
    assert counts["bursts"] == len(halves) + counts["bursts_too_short"]
    assert counts["sessions"] >= 1
    assert stats.is_balanced()
    assert len({h.key for h in halves}) == len(halves)
    for item in halves:
        assert len(item.a) - len(item.b) in (0, 1)
        assert len(item.b) >= 2


def test_burst_too_short_counted(sample_captures):
    settings = ConvertSettings(bytes_per_packet=1)
    counts = Counter()
    path = str(sample_captures / TLS13)
    halves = list(convert.iter_burst_halves([path], [TLS13], TLS13, settings, SkipCounter(), counts))
    # One byte per packet: BURSTs of fewer than 4 packets are too short to give both halves a bigram.
    assert counts["bursts_too_short"] > 0
    assert len(halves) + counts["bursts_too_short"] == counts["bursts"]
    assert all(len(item.a) + len(item.b) >= 4 for item in halves)


def test_etbert_policy_burst_is_raw_frame_prefix(sample_captures):
    settings = ConvertSettings(header_policy="etbert")
    path = str(sample_captures / TLS13)
    frames = frames_of(path)
    halves = list(convert.iter_burst_halves([path], [TLS13], TLS13, settings, SkipCounter(), Counter()))
    first = halves[0]
    assert (first.a + first.b).startswith(frames[0][:64])


def test_etbert_packet_examples_match_reference(sample_captures, etbert_vocab_path):
    vocab = Vocab.from_file(etbert_vocab_path)
    settings = ConvertSettings(header_policy="etbert", vocab=str(etbert_vocab_path))
    path = str(sample_captures / TLS13)
    frames = frames_of(path)
    examples = list(convert.iter_packet_examples([path], settings, vocab))
    assert len(examples) == len(frames)
    for example, frame in zip(examples, frames):
        expected = [vocab.cls_id] + vocab.encode(frame[38:], 128)[:128].tolist()
        assert example.input_ids.tolist() == expected[:128]
        assert example.packet_index >= 0
        assert example.input_ids.max() < vocab.size


def test_flow_examples_concatenate_packets(sample_captures):
    vocab = Vocab.default()
    settings = ConvertSettings(header_policy="etbert", tokens_per_packet=20, packets_per_flow=3, flow_seq_len=512)
    path = str(sample_captures / SSH)
    frames = frames_of(path)
    flows = list(convert.iter_flow_examples([path], settings, vocab))
    assert len(flows) >= 1
    first = flows[0]
    assert first.packet_index == -1
    expected = [vocab.cls_id]
    for frame in frames[:3]:
        expected.extend(vocab.encode(frame[38:], 20).tolist())
    assert first.input_ids.tolist() == expected
    assert first.session.startswith("tcp ")


def test_flow_seq_len_cuts(sample_captures):
    settings = ConvertSettings(flow_seq_len=50)
    flows = list(convert.iter_flow_examples([str(sample_captures / SSH)], settings))
    assert max(len(f.input_ids) for f in flows) == 50


def test_packet_cap_per_session(sample_captures):
    settings = ConvertSettings(max_packets_per_session=2)
    path = str(sample_captures / SSH)
    examples = list(convert.iter_packet_examples([path], settings))
    per_session = Counter(e.session_uid for e in examples)
    assert max(per_session.values()) == 2
    uncapped = list(convert.iter_packet_examples([path], ConvertSettings()))
    assert len(uncapped) > len(examples)


def test_finetune_levels_and_text(sample_captures):
    settings = ConvertSettings(tokens_per_packet=8)
    counts = Counter()
    path = str(sample_captures / TLS13)
    examples = list(convert.iter_finetune_examples([path], settings, Vocab.default(), names=[TLS13],
                                                   counts=counts, with_text=True))
    levels = Counter(e.level for e in examples)
    assert levels["flow"] == counts["sessions"]
    assert levels["packet"] > levels["flow"]
    for example in examples:
        assert example.source == TLS13
        words = example.text.split()
        assert all(len(word) == 4 for word in words)
        # With the bigram vocab every word is one token after [CLS].
        assert len(words) >= len(example.input_ids) - 1
    with pytest.raises(ValueError, match="levels"):
        list(convert.iter_finetune_examples([path], settings, Vocab.default(), levels=("burst",)))


def test_finetune_example_bytes_parse(sample_captures):
    examples = list(convert.iter_flow_examples([str(sample_captures / TLS13)], ConvertSettings()))
    data = convert.finetune_example_bytes(examples[0], label=4)
    parsed = tf.io.parse_single_example(data, records.finetune_feature_spec())
    assert tf.sparse.to_dense(parsed["input_ids"]).numpy().tolist() == examples[0].input_ids.tolist()
    assert int(parsed["label"]) == 4
    assert int(parsed["packet_index"]) == -1
    assert parsed["session"].numpy().decode() == examples[0].session


def test_pretrain_example_bytes_parse():
    vocab = Vocab.default()
    item = burst("k", "s", a=bytes(range(10)), b=bytes(range(10, 18)))
    data = convert.pretrain_example_bytes(item, item.b, 0, vocab, ConvertSettings())
    parsed = tf.io.parse_single_example(data, records.pretrain_feature_spec())
    input_ids = tf.sparse.to_dense(parsed["input_ids"]).numpy().tolist()
    assert input_ids == [2] + vocab.encode(item.a).tolist() + [1] + vocab.encode(item.b).tolist() + [1]
    assert int(parsed["sbp_label"]) == 0


@pytest.mark.parametrize("field,value", [("header_policy", "none"), ("bytes_per_packet", 0), ("seq_len", 4),
                                         ("negative_ratio", 1.5), ("flow_seq_len", 1),
                                         ("max_packets_per_session", 0), ("num_shards", 0)])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field if field != "header_policy" else "header_policy"):
        ConvertSettings(**{field: value})


def test_tokenizer_block():
    block = ConvertSettings(header_policy="etbert").tokenizer_block(Vocab.default())
    assert block["vocab_kind"] == "bigram"
    assert block["vocab_size"] == 65541
    assert block["header_policy"] == "etbert"
    assert block["finetune_offset"] == 38
    assert block["bytes_per_packet"] == 64


@pytest.mark.parametrize("seed", range(10))
def test_pretrain_instance_matches_concatenation(seed):
    rng = np.random.default_rng(seed)
    vocab = Vocab.default()
    ids_a = rng.integers(5, 65541, size=int(rng.integers(0, 200))).astype(np.int32)
    ids_b = rng.integers(5, 65541, size=int(rng.integers(0, 200))).astype(np.int32)
    seq_len = int(rng.choice([5, 6, 64, 128, 512]))
    keep_a, keep_b = convert.truncate_pair(len(ids_a), len(ids_b), seq_len - 3)
    expected_ids = np.concatenate([[vocab.cls_id], ids_a[:keep_a], [vocab.sep_id], ids_b[:keep_b], [vocab.sep_id]])
    expected_segments = np.concatenate([np.ones(keep_a + 2, dtype=np.int64), np.full(keep_b + 1, 2, dtype=np.int64)])
    input_ids, segment_ids = convert.pretrain_instance(ids_a, ids_b, vocab, seq_len)
    assert input_ids.dtype == np.int64
    assert segment_ids.dtype == np.int64
    assert input_ids.tolist() == expected_ids.astype(np.int64).tolist()
    assert segment_ids.tolist() == expected_segments.tolist()


@pytest.mark.parametrize("packet_seq_len", [2, 3, 60, 128, 129, 512])
def test_packet_input_ids_match_concatenation(sample_captures, packet_seq_len):
    settings = ConvertSettings(packet_seq_len=packet_seq_len)
    vocab = Vocab.default()
    for data in frames_of(sample_captures / TLS13)[:40] + [b"", b"\x01", b"\x01\x02"]:
        tokens = convert.packet_tokens(data, vocab, settings)
        expected = np.concatenate([[vocab.cls_id], tokens])[:packet_seq_len].astype(np.int64)
        got = convert.packet_input_ids(data, vocab, settings)
        assert got.dtype == np.int64
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("seq_len", [5, 6, 40, 128])
def test_pretrain_instances_match_per_pair(sample_captures, etbert_vocab_path, seq_len):
    # One compiled loop builds every row; each row equals the per-pair instance, for both vocabularies.
    frames = frames_of(sample_captures / TLS13)
    rng = random.Random(seq_len)
    pairs = []
    for index in range(120):
        a, b = rng.choice(frames)[: rng.randrange(2, 300)], rng.choice(frames)[: rng.randrange(2, 300)]
        pairs.append((burst(f"k{index}", "s", a, b), b if index % 3 else a, index % 2))

    for vocab in (Vocab.default(), Vocab.from_file(etbert_vocab_path)):
        input_ids, segment_ids, lengths = convert.pretrain_instances(pairs, vocab, seq_len)
        for row, (halves, b_half, _) in enumerate(pairs):
            expected_ids, expected_segments = convert.pretrain_instance(
                vocab.encode(halves.a), vocab.encode(b_half), vocab, seq_len)
            assert lengths[row] == len(expected_ids)
            assert np.array_equal(input_ids[row, : lengths[row]], expected_ids)
            assert np.array_equal(segment_ids[row, : lengths[row]], expected_segments)


def test_pretrain_examples_bytes_match_per_pair(sample_captures):
    frames = frames_of(sample_captures / SSH)[:40]
    pairs = [(burst(f"k{i}", f"s{i % 4}", frame[:30], frame[30:70]), frame[30:70], i % 2)
             for i, frame in enumerate(frames) if len(frame) > 40]
    vocab, settings = Vocab.default(), ConvertSettings()
    batch = convert.pretrain_examples_bytes(pairs, vocab, settings)
    for (halves, b_half, label), data in zip(pairs, batch):
        ids, segments = convert.pretrain_instance(vocab.encode(halves.a), vocab.encode(b_half), vocab,
                                                  settings.seq_len)
        assert data == records.pretrain_example(ids, segments, label)


def test_flow_input_ids_many_match_concatenation(sample_captures):
    frames = frames_of(sample_captures / TLS13)
    settings = ConvertSettings(flow_seq_len=300)
    vocab = Vocab.default()
    flows = [frames[start : start + count] for start, count in ((0, 5), (5, 1), (6, 9), (15, 0), (20, 3))]
    ids, lengths = convert.flow_input_ids_many(flows, vocab, settings)
    for row, packets in enumerate(flows):
        parts = [[vocab.cls_id]] + [vocab.encode(data, 128)[:128] for data in packets[:5]]
        expected = np.concatenate(parts)[:300]
        assert np.array_equal(ids[row, : lengths[row]], expected)


def test_finetune_examples_bytes_match_per_example(sample_captures):
    settings, vocab = ConvertSettings(), Vocab.default()
    examples = list(convert.iter_finetune_examples([str(sample_captures / TLS13)], settings, vocab))
    labels = [index % 3 for index in range(len(examples))]
    batch = convert.finetune_examples_bytes(examples, labels)
    assert len(batch) == len(examples) > 10
    for example, label, data in zip(examples, labels, batch):
        assert data == records.finetune_example(example.input_ids, label, example.source, example.session,
                                                example.packet_index)
    with pytest.raises(ValueError, match="one label per example"):
        convert.finetune_examples_bytes(examples, labels[:-1])
