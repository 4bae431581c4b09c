"""Tests for etbert_jax.tokenizer: bigram ids, WordPiece on the ET-BERT vocab, manifests."""

import hashlib

import dpkt
import numpy as np
import pytest

from etbert_jax import tokenizer
from etbert_jax.tokenizer import Vocab


@pytest.fixture(scope="module")
def etbert_vocab(etbert_vocab_path):
    return Vocab.from_file(etbert_vocab_path)


@pytest.fixture(scope="module")
def packet_bytes(sample_captures):
    """Frames of a few real captures, read with dpkt (parse only)."""
    frames = []
    for name in ("tls13/arkime-curl-tls13.pcap", "ssh/tcpdump-ssh.pcap", "quic/zeek-quic-doq.pcap"):
        with open(sample_captures / name, "rb") as handle:
            for _, frame in dpkt.pcap.Reader(handle):
                frames.append(bytes(frame))
    return frames


def reference_wordpiece_ids(data: bytes, lines: list[str], max_words: int | None = None) -> list[int]:
    """ET-BERT's path spelled out word by word: hex bigram words, then greedy WordPiece."""
    token_to_id = {}
    for index, line in enumerate(lines):
        token_to_id[line.split()[0] if line.split() else line] = index
    hex_text = data.hex()
    words = [hex_text[i:i + 4] for i in range(0, len(hex_text) - 2, 2)]
    if max_words is not None:
        words = words[:max_words]
    ids = []
    for word in words:
        word = word.lower()
        pieces = []
        start = 0
        bad = False
        while start < len(word):
            end = len(word)
            match = None
            while start < end:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in token_to_id:
                    match = token_to_id[candidate]
                    break
                end -= 1
            if match is None:
                bad = True
                break
            pieces.append(match)
            start = end
        ids.extend([token_to_id["[UNK]"]] if bad else pieces)
    return ids


def test_default_id_formula():
    vocab = Vocab.default()
    data = bytes([0x00, 0x00, 0xFF, 0x12, 0x34])
    ids = vocab.encode(data)
    expected = [5 + 256 * data[i] + data[i + 1] for i in range(len(data) - 1)]
    assert ids.dtype == np.int32
    assert ids.tolist() == expected
    assert vocab.size == 65541
    assert vocab.kind == "bigram"


def test_default_special_ids():
    vocab = Vocab.default()
    assert (vocab.pad_id, vocab.sep_id, vocab.cls_id, vocab.unk_id, vocab.mask_id) == (0, 1, 2, 3, 4)
    assert vocab.special_ids == {"[PAD]": 0, "[SEP]": 1, "[CLS]": 2, "[UNK]": 3, "[MASK]": 4}
    assert vocab.tokens[5 + 0xABCD] == "abcd"


@pytest.mark.parametrize("length", [2, 3, 17, 200])
def test_n_bytes_give_n_minus_one(length):
    data = bytes(np.random.default_rng(length).integers(0, 256, size=length, dtype=np.uint8))
    assert Vocab.default().encode(data).shape == (length - 1,)


@pytest.mark.parametrize("data", [b"", b"\x07"])
def test_short_input_gives_no_tokens(data, etbert_vocab):
    for vocab in (Vocab.default(), etbert_vocab):
        ids = vocab.encode(data)
        assert ids.shape == (0,)
        assert ids.dtype == np.int32


def test_max_tokens_cuts_bigrams():
    data = bytes(range(50))
    vocab = Vocab.default()
    assert vocab.encode(data, max_tokens=10).tolist() == vocab.encode(data)[:10].tolist()
    assert vocab.encode(data, max_tokens=0).shape == (0,)
    assert vocab.encode(data, max_tokens=1000).shape == (49,)
    with pytest.raises(ValueError, match="max_tokens"):
        vocab.encode(data, max_tokens=-1)


def test_bigram_words_match_ids():
    data = bytes([0x16, 0x03, 0x01, 0x02, 0x00])
    assert tokenizer.bigram_words(data) == ["1603", "0301", "0102", "0200"]
    assert tokenizer.bigram_words(data, max_tokens=2) == ["1603", "0301"]
    assert tokenizer.bigram_words(b"\x01") == []


def test_etbert_vocab_layout(etbert_vocab, etbert_vocab_path):
    lines = etbert_vocab_path.read_text().splitlines()
    assert etbert_vocab.size == len(lines) == 60005
    assert etbert_vocab.kind == "wordpiece"
    assert etbert_vocab.special_ids == {"[PAD]": 0, "[SEP]": 1, "[CLS]": 2, "[UNK]": 3, "[MASK]": 4}
    assert etbert_vocab.sha256 == hashlib.sha256(etbert_vocab_path.read_bytes()).hexdigest()


def test_etbert_known_token_ids(etbert_vocab, etbert_vocab_path):
    lines = etbert_vocab_path.read_text().splitlines()
    for word in ("0000", "1603", "0303", "ffff"):
        if word not in lines:
            continue
        line_number = lines.index(word) + 1
        data = bytes.fromhex(word)
        assert etbert_vocab.encode(data).tolist() == [line_number - 1]
    # "0000" is on line 42 of the released file, so its id is 41.
    assert etbert_vocab.encode(b"\x00\x00").tolist() == [41]


def test_etbert_wordpiece_matches_reference(etbert_vocab, etbert_vocab_path, packet_bytes):
    lines = etbert_vocab_path.read_text().splitlines()
    assert len(packet_bytes) > 20
    for frame in packet_bytes:
        assert etbert_vocab.encode(frame).tolist() == reference_wordpiece_ids(frame, lines)
        assert etbert_vocab.encode(frame, max_tokens=64).tolist() == reference_wordpiece_ids(
            frame, lines, max_words=64)


def test_etbert_multi_piece_bigrams(etbert_vocab, etbert_vocab_path):
    """Bigrams missing from the file split into pieces; every bigram must match the reference."""
    lines = etbert_vocab_path.read_text().splitlines()
    present = set(lines)
    absent = [k for k in range(65536) if f"{k:04x}" not in present]
    assert absent, "the released vocab lacks some bigrams, so WordPiece splitting must occur"
    data = b"".join(k.to_bytes(2, "big") for k in absent[:300])
    ids = etbert_vocab.encode(data)
    assert ids.tolist() == reference_wordpiece_ids(data, lines)
    assert ids.shape[0] > len(data) - 1


def test_ids_below_vocab_size(etbert_vocab, packet_bytes):
    for vocab in (Vocab.default(), etbert_vocab):
        ids = np.concatenate([vocab.encode(frame) for frame in packet_bytes])
        assert ids.min() >= 0
        assert ids.max() < vocab.size


def test_manifest_round_trip(etbert_vocab, etbert_vocab_path):
    block = etbert_vocab.to_manifest()
    assert block["vocab_kind"] == "wordpiece"
    assert block["vocab_size"] == 60005
    again = Vocab.from_manifest(block, vocab_path=etbert_vocab_path)
    assert again.sha256 == etbert_vocab.sha256

    default_block = Vocab.default().to_manifest()
    assert Vocab.from_manifest(default_block).sha256 == Vocab.default().sha256


def test_manifest_hash_mismatch(etbert_vocab_path):
    block = Vocab.default().to_manifest()
    block["vocab_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        Vocab.from_manifest(block)
    wordpiece_block = {"vocab_kind": "wordpiece", "vocab_sha256": "1" * 64}
    with pytest.raises(ValueError, match="sha256"):
        Vocab.from_manifest(wordpiece_block, vocab_path=etbert_vocab_path)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Vocab.from_file(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("[PAD]\n0000\n")
    with pytest.raises(ValueError, match="special tokens"):
        Vocab.from_file(bad)


@pytest.mark.parametrize("max_tokens", [0, 1, 5, 128])
@pytest.mark.parametrize("first_id", [None, 2])
def test_encode_many_matches_encode_bigram(packet_bytes, max_tokens, first_id):
    vocab = Vocab.default()
    datas = packet_bytes[:200] + [b"", b"\x01", b"\x01\x02"]
    ids, lengths = vocab.encode_many(datas, max_tokens, first_id)

    lead = [] if first_id is None else [first_id]
    assert ids.shape == (len(datas), len(lead) + max_tokens)
    for row, data in enumerate(datas):
        expected = np.concatenate([lead, vocab.encode(data, max_tokens)[:max_tokens]]).astype(np.int64)
        assert lengths[row] == len(expected)
        assert np.array_equal(ids[row, : lengths[row]], expected)
        assert (ids[row, lengths[row]:] == vocab.pad_id).all()


@pytest.mark.parametrize("max_tokens", [3, 128])
def test_encode_many_matches_encode_wordpiece(etbert_vocab, packet_bytes, max_tokens):
    # The ET-BERT file splits some bigrams into several pieces; rows are still cut to max_tokens ids.
    datas = packet_bytes[:200]
    ids, lengths = etbert_vocab.encode_many(datas, max_tokens)

    for row, data in enumerate(datas):
        expected = etbert_vocab.encode(data, max_tokens)[:max_tokens]
        assert np.array_equal(ids[row, : lengths[row]], expected)
        assert (ids[row, lengths[row]:] == etbert_vocab.pad_id).all()


def test_encode_many_rejects_negative_max_tokens():
    with pytest.raises(ValueError, match="max_tokens"):
        Vocab.default().encode_many([b"abc"], -1)
