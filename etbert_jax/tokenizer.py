"""Datagram2Token: packet bytes -> overlapping byte-bigram token ids.

This is the only tokenizer in etbert-jax: the Beam pipelines, training and prediction all call
`Vocab.encode`, so pre-processing and inference never disagree.

Bytes `b0 b1 b2 ...` become the overlapping bigrams `(b0 b1), (b1 b2), ...`, so n bytes give n - 1
bigrams (none for n < 2). Two vocabularies are supported:

- `Vocab.default()`: ids 0-4 are `[PAD] [SEP] [CLS] [UNK] [MASK]`, then every one of the 65,536
  bigrams with id `5 + 256 * b0 + b1` (size 65,541, no bigram is unknown).
- `Vocab.from_file(path)`: an ET-BERT vocabulary file (one token per line, id = line number - 1).
  Each bigram is written as a 4-character lowercase hex word and split by WordPiece exactly as
  UER's `BertTokenizer` does. The longest vocabulary match is taken from the left, continuation
  pieces carry a `##` prefix, and a word that cannot be covered completely becomes one `[UNK]`.

Since there are only 65,536 possible words, the WordPiece result of every bigram is computed once
into a flat table (`offsets`, `pieces`), so encoding stays a few numpy operations per packet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from collections.abc import Sequence

import numba
import numpy as np

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[SEP]", "[CLS]", "[UNK]", "[MASK]")
NUM_BIGRAMS = 65536

# UER's WordpieceTokenizer maps words longer than this to [UNK]; bigram words have 4 characters.
_MAX_WORD_CHARS = 200


def bigram_indices(data: bytes, max_tokens: int | None = None) -> np.ndarray:
    """Return the overlapping bigrams of `data` as integers `256 * b0 + b1` (int32).

    `max_tokens` keeps only the first `max_tokens` bigrams, which needs `max_tokens + 1` bytes.
    """
    if max_tokens is not None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
        data = data[: max_tokens + 1]
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < 2:
        return np.zeros((0,), dtype=np.int32)
    values = raw.astype(np.int32)
    return (values[:-1] << 8) | values[1:]


def bigram_words(data: bytes, max_tokens: int | None = None) -> list[str]:
    """Return the bigrams of `data` as 4-character lowercase hex words, as ET-BERT writes them.

    Only for text output (TSV files, debugging); `Vocab.encode` never builds strings.
    """
    hex_text = bytes(data[: None if max_tokens is None else max_tokens + 1]).hex()
    return [hex_text[i : i + 4] for i in range(0, len(hex_text) - 2, 2)]


def wordpiece(word: str, token_to_id: dict[str, int], unk_id: int) -> list[int]:
    """Split one word into vocabulary ids by greedy longest-match-first WordPiece.

    Follows UER's `WordpieceTokenizer`: the longest prefix found in the vocabulary is taken, the
    rest continues with `##`-prefixed pieces, and a word with any uncovered part becomes `[UNK]`.
    """
    if len(word) > _MAX_WORD_CHARS:
        return [unk_id]
    ids = []
    start = 0
    while start < len(word):
        end = len(word)
        found = None
        while start < end:
            piece = word[start:end]
            if start > 0:
                piece = "##" + piece
            if piece in token_to_id:
                found = token_to_id[piece]
                break
            end -= 1
        if found is None:
            return [unk_id]
        ids.append(found)
        start = end
    return ids


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
    """A token vocabulary and its precomputed bigram -> id table."""

    # "bigram" for the built-in vocabulary, "wordpiece" for an ET-BERT vocabulary file.
    kind: str
    # Token strings in id order; `tokens[i]` has id i.
    tokens: tuple[str, ...]
    # SHA-256 hex digest of the vocabulary file bytes (or of the built-in token list, one per line).
    sha256: str
    # For bigram k = 256 * b0 + b1, its ids are `pieces[offsets[k]:offsets[k + 1]]` (int32).
    offsets: np.ndarray
    # Concatenated ids of all 65,536 bigrams (int32); most bigrams have exactly one id.
    pieces: np.ndarray
    # Path the vocabulary was read from, or None for the built-in one.
    path: str | None = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def default(cls) -> "Vocab":
        """Build the built-in vocabulary: 5 special tokens, then all bigrams in numeric order."""
        tokens = SPECIAL_TOKENS + tuple(f"{k:04x}" for k in range(NUM_BIGRAMS))
        digest = hashlib.sha256("\n".join(tokens).encode("ascii")).hexdigest()
        offsets = np.arange(NUM_BIGRAMS + 1, dtype=np.int64)
        pieces = np.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + NUM_BIGRAMS, dtype=np.int32)
        return cls(kind="bigram", tokens=tokens, sha256=digest, offsets=offsets, pieces=pieces)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "Vocab":
        """Load an ET-BERT (UER) vocabulary file and precompute WordPiece ids of every bigram."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}; pass an ET-BERT vocab file "
                                    "such as encryptd_vocab.txt, or no vocab for the built-in one")
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()

        # UER reads the first whitespace-separated field of each line; a later duplicate wins.
        tokens = []
        token_to_id: dict[str, int] = {}
        for index, line in enumerate(raw.decode("utf-8").splitlines()):
            fields = line.split()
            token = fields[0] if fields else line
            tokens.append(token)
            token_to_id[token] = index

        missing = [name for name in SPECIAL_TOKENS if name not in token_to_id]
        if missing:
            raise ValueError(f"vocabulary {path} lacks the special tokens {missing}; "
                             "an ET-BERT vocab file must contain all of " + " ".join(SPECIAL_TOKENS))

        # WordPiece of every possible bigram word, flattened into offsets + pieces.
        unk_id = token_to_id["[UNK]"]
        lengths = np.zeros(NUM_BIGRAMS, dtype=np.int64)
        flat: list[int] = []
        for k in range(NUM_BIGRAMS):
            ids = wordpiece(f"{k:04x}", token_to_id, unk_id)
            lengths[k] = len(ids)
            flat.extend(ids)
        offsets = np.zeros(NUM_BIGRAMS + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = np.asarray(flat, dtype=np.int32)

        vocab = cls(kind="wordpiece", tokens=tuple(tokens), sha256=digest, offsets=offsets,
                    pieces=pieces, path=str(path))
        split = int(np.sum(lengths > 1))
        unknown = int(np.sum((lengths == 1) & (pieces[offsets[:-1]] == unk_id)))
        log.info("vocab %s: %d tokens, sha256 %s; of 65,536 bigrams %d split into several pieces, "
                 "%d map to [UNK]", path, vocab.size, digest[:12], split, unknown)
        return vocab

    @classmethod
    def load(cls, path: str | pathlib.Path | None) -> "Vocab":
        """Load `path`, or build the built-in vocabulary when `path` is None or empty."""
        return cls.default() if not path else cls.from_file(path)

    # ---- properties --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of ids, which is the embedding table size a model needs."""
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        """Return the id of `token`; the last occurrence wins, as in UER."""
        for index in range(len(self.tokens) - 1, -1, -1):
            if self.tokens[index] == token:
                return index
        raise KeyError(f"token {token!r} is not in the {self.kind} vocabulary")

    @property
    def pad_id(self) -> int:
        return self._special["[PAD]"]

    @property
    def sep_id(self) -> int:
        return self._special["[SEP]"]

    @property
    def cls_id(self) -> int:
        return self._special["[CLS]"]

    @property
    def unk_id(self) -> int:
        return self._special["[UNK]"]

    @property
    def mask_id(self) -> int:
        return self._special["[MASK]"]

    @property
    def special_ids(self) -> dict[str, int]:
        """Map of special token name -> id."""
        return dict(self._special)

    @property
    def _special(self) -> dict[str, int]:
        cached = self.__dict__.get("_special_cache")
        if cached is None:
            cached = {name: self.id_of(name) for name in SPECIAL_TOKENS}
            object.__setattr__(self, "_special_cache", cached)
        return cached

    # ---- encoding ----------------------------------------------------------------------------

    def encode(self, data: bytes, max_tokens: int | None = None) -> np.ndarray:
        """Tokenize `data` into int32 ids.

        `max_tokens` keeps the first `max_tokens` bigrams before the WordPiece lookup, as ET-BERT
        cuts its bigram text before tokenizing. With the built-in vocabulary each bigram is one id,
        so the result has at most `max_tokens` ids. With a WordPiece file, a bigram the file lacks
        becomes several pieces (the released ET-BERT file lists 57,640 of the 65,536 bigrams), so
        callers that need a hard limit cut the result again.
        """
        index = bigram_indices(data, max_tokens)
        if self.kind == "bigram":
            return (index + len(SPECIAL_TOKENS)).astype(np.int32)

        starts = self.offsets[index]
        lengths = self.offsets[index + 1] - starts
        if index.size == 0 or np.all(lengths == 1):
            return self.pieces[starts]

        # Some bigrams expand to several pieces: gather each bigram's run of ids.
        total = int(lengths.sum())
        run_starts = np.cumsum(lengths) - lengths
        positions = np.repeat(starts - run_starts, lengths) + np.arange(total)
        return self.pieces[positions]

    def encode_many(self, datas: Sequence[bytes], max_tokens: int,
                    first_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize many byte strings at once; return (ids (n, max_tokens) int64, lengths).

        Row i contains `encode(datas[i], max_tokens)[:max_tokens]` in its first `lengths[i]` columns and
        `[PAD]` after them. With `first_id` (e.g. `[CLS]`), every row starts with that id, the array
        has max_tokens + 1 columns and the lengths count it. One compiled loop tokenizes the batch.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        blob, starts, sizes = pack_bytes(datas)
        lead = 0 if first_id is None else 1
        ids = np.empty((len(datas), lead + max_tokens), dtype=np.int64)
        lengths = np.empty(len(datas), dtype=np.int64)
        # The built-in vocabulary maps bigram k to id k + 5, which the loop computes without a lookup.
        direct = len(SPECIAL_TOKENS) if self.kind == "bigram" else -1
        _encode_rows(blob, starts, sizes, self.offsets, self.pieces, direct, max_tokens, self.pad_id,
                     -1 if first_id is None else first_id, ids, lengths)
        return ids, lengths

    def words(self, ids: np.ndarray) -> list[str]:
        """Return the token strings of `ids` (for debugging and TSV output)."""
        return [self.tokens[int(i)] for i in ids]

    # ---- manifest ----------------------------------------------------------------------------

    def to_manifest(self) -> dict:
        """Describe this vocabulary for a shard manifest or checkpoint config."""
        return {
            "vocab_kind": self.kind,
            "vocab_size": self.size,
            "vocab_sha256": self.sha256,
            "vocab_path": self.path,
            "special_ids": self.special_ids,
        }

    @classmethod
    def from_manifest(cls, block: dict, vocab_path: str | pathlib.Path | None = None) -> "Vocab":
        """Rebuild the vocabulary a manifest describes and check that its hash matches.

        `vocab_path` overrides the path stored in the manifest (the file may have moved).
        """
        kind = block.get("vocab_kind")
        if kind == "bigram":
            vocab = cls.default()
        elif kind == "wordpiece":
            path = vocab_path or block.get("vocab_path")
            if not path:
                raise ValueError("the manifest uses a wordpiece vocabulary but stores no path; "
                                 "pass vocab_path pointing at the vocab file used for conversion")
            vocab = cls.from_file(path)
        else:
            raise ValueError(f"unknown vocab_kind {kind!r} in manifest; expected 'bigram' or 'wordpiece'")

        expected = block.get("vocab_sha256")
        if expected and expected != vocab.sha256:
            raise ValueError(f"vocabulary {vocab.path or 'built-in'} has sha256 {vocab.sha256}, but the "
                             f"manifest expects {expected}; use the vocab file the shards were made with")
        return vocab


def pack_bytes(datas: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate byte strings into one uint8 array; return (buffer, start of each, size of each)."""
    sizes = np.fromiter(map(len, datas), dtype=np.int64, count=len(datas))
    starts = np.cumsum(sizes) - sizes
    return np.frombuffer(b"".join(datas), dtype=np.uint8), starts, sizes


@numba.njit(cache=True)
def _encode_rows(blob, starts, sizes, offsets, pieces, direct, max_tokens, pad, first_id, ids, lengths):
    """Write the first `max_tokens` ids of each byte string's first `max_tokens` bigrams into `ids`.

    `direct` >= 0 means bigram k has the single id k + direct; `first_id` >= 0 goes before the tokens.
    """
    lead = 1 if first_id >= 0 else 0
    for row in range(starts.shape[0]):
        line = ids[row]
        if lead:
            line[0] = first_id
        start = starts[row]
        bigrams = min(sizes[row] - 1, max_tokens)
        count = 0
        if direct >= 0:
            for j in range(bigrams):
                line[lead + j] = ((np.int64(blob[start + j]) << 8) | np.int64(blob[start + j + 1])) + direct
            count = max(bigrams, 0)
        else:
            count = write_tokens(blob, start, bigrams, offsets, pieces, max_tokens, line, lead)
        lengths[row] = lead + count
        for column in range(lead + count, lead + max_tokens):
            line[column] = pad


@numba.njit(cache=True)
def write_tokens(blob, start, bigrams, offsets, pieces, keep, row, position):
    """Write the first `keep` ids of the first `bigrams` bigrams from blob[start:] into `row` at `position`.

    Returns how many ids were written (compiled; WordPiece pieces included).
    """
    written = 0
    for j in range(bigrams):
        index = (np.int64(blob[start + j]) << 8) | np.int64(blob[start + j + 1])
        for piece in range(offsets[index], offsets[index + 1]):
            if written == keep:
                return written
            row[position + written] = pieces[piece]
            written += 1
    return written


@numba.njit(cache=True)
def pieces_count(blob, start, size, offsets):
    """Return how many ids `encode` gives for the byte string blob[start : start + size] (compiled)."""
    count = 0
    for j in range(size - 1):
        index = (np.int64(blob[start + j]) << 8) | np.int64(blob[start + j + 1])
        count += offsets[index + 1] - offsets[index]
    return count
