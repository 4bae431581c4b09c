"""Conversion core: captures -> sessions -> token ids -> serialized examples. Pure functions, no Beam.

The Beam pipelines, the input benchmark and prediction all call these functions, so a capture is
tokenized the same way wherever it is read.

Pre-training (ET-BERT's BURST corpus):
1. Sessions are split into BURSTs, maximal runs of same-direction packets. Each packet contributes its
   first `bytes_per_packet` policy-applied bytes (the capture layer applies the header policy).
2. A BURST's concatenated bytes are cut into two byte-aligned halves at ceil(n / 2), the sub-BURSTs
   A and B. A BURST shorter than 4 bytes leaves B without a bigram; it is counted and skipped.
3. Same-origin BURST Prediction pairs: A with its own B (`sbp_label` 0), or, for a seeded fraction
   `negative_ratio`, A with the B half of a BURST from another session (`sbp_label` 1). Pairing runs
   per bucket of BURSTs (`pair_bucket`), so it is deterministic and scales out.
4. `[CLS] A [SEP] B [SEP]` truncated to `seq_len` like BERT's truncate_seq_pair (the longer half
   loses its last token first), segment ids 1 and 2. Masking happens at training time.

Fine-tuning:
- Flow level: the first `packets_per_flow` packets of a session, each tokenized on its own and cut
  to `tokens_per_packet` tokens, concatenated, then `[CLS]` + tokens cut to `flow_seq_len`.
- Packet level: one example per packet, `[CLS]` + its first `tokens_per_packet` tokens, cut to
  `packet_seq_len`; at most `max_packets_per_session` per session when set.
- With header policy `etbert`, fine-tuning bytes are the captured frame minus its first 38 bytes,
  as ET-BERT cuts them. The other policies use the policy's bytes unchanged.

NOTE: ET-BERT also shortens 10 % of its pre-training pairs at random (`short_seq_prob`); pairs here
are only cut by `seq_len`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numba
import numpy as np

from etbert_jax import records
from etbert_jax.capture import (
    ETBERT_FINETUNE_OFFSET,
    Burst,
    CaptureFormatError,
    PacketBytes,
    SessionEnd,
    SessionOptions,
    SkipCounter,
    check_header_policy,
    iter_session_event_lists,
    iter_sessions,
)
from etbert_jax.tokenizer import Vocab, bigram_words, pack_bytes, pieces_count, write_tokens

LEVELS = ("packet", "flow")
# Builds a named tuple from a tuple of all its fields, without its Python-level constructor.
_new_tuple = tuple.__new__
# SBP pairs tokenized and serialized together by `pretrain_examples_bytes`.
_PAIRS_PER_CHUNK = 512
# Sort key of BURSTs inside a pairing bucket: (digest, key).
_BY_DIGEST = operator.itemgetter(4, 0)


@dataclasses.dataclass(frozen=True)
class ConvertSettings:
    """Every option that changes which examples a capture gives; recorded in each manifest."""

    # Which packet bytes become tokens: anonymize | strip-link | raw | etbert (ET-BERT's exact bytes).
    header_policy: str = "anonymize"
    # ET-BERT vocabulary file (WordPiece); None for the built-in 65,541-id bigram vocabulary.
    vocab: str | None = None
    # Bytes of each packet that go into a BURST (pre-training); ET-BERT uses 64.
    bytes_per_packet: int = 64
    # Bigram tokens kept per packet in fine-tuning examples; ET-BERT uses 128.
    tokens_per_packet: int = 128
    # First packets of a session that form a flow-level example; ET-BERT uses 5.
    packets_per_flow: int = 5
    # Max tokens of a pre-training example, [CLS] and both [SEP] included.
    seq_len: int = 128
    # Max tokens of a packet-level fine-tuning example, [CLS] included.
    packet_seq_len: int = 128
    # Max tokens of a flow-level fine-tuning example, [CLS] included.
    flow_seq_len: int = 512
    # Cap on packet-level examples per session; None for no cap.
    max_packets_per_session: int | None = None
    # Fraction of BURSTs whose B half is replaced by one from another session (SBP label 1), in [0, 1].
    negative_ratio: float = 0.5
    # Number of buckets BURSTs are hashed into for negative pairing; one bucket is held in memory at once.
    pair_buckets: int = 64
    # Seed of the pairing RNG and of the split shuffles.
    seed: int = 0
    # Seconds without packets after which a session ends; 0 or None disables it.
    idle_timeout_s: float | None = 120.0
    # Seconds after its first packet at which a session ends; 0 or None disables it.
    active_timeout_s: float | None = 3600.0
    # End TCP sessions after RST or both FINs.
    split_on_fin_rst: bool = True
    # TFRecord files per output; pre-training uses a multiple of 64 so every host of a pod reads whole files.
    num_shards: int = 64
    # Read files whose names differ only in a trailing number as one capture series.
    series: bool = True

    def __post_init__(self) -> None:
        check_header_policy(self.header_policy)
        positive = ("bytes_per_packet", "tokens_per_packet", "packets_per_flow", "pair_buckets", "num_shards")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"ConvertSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 5:
            raise ValueError(f"ConvertSettings.seq_len must be >= 5 ([CLS] A [SEP] B [SEP]), got {self.seq_len}")
        for name in ("packet_seq_len", "flow_seq_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"ConvertSettings.{name} must be >= 2 ([CLS] and a token), got {getattr(self, name)}")
        if not 0.0 <= self.negative_ratio <= 1.0:
            raise ValueError(f"ConvertSettings.negative_ratio must be in [0, 1], got {self.negative_ratio}")
        if self.max_packets_per_session is not None and self.max_packets_per_session < 1:
            raise ValueError("ConvertSettings.max_packets_per_session must be >= 1 or None, got "
                             f"{self.max_packets_per_session}")

    @property
    def session_options(self) -> SessionOptions:
        return SessionOptions(idle_timeout_s=self.idle_timeout_s or None,
                              active_timeout_s=self.active_timeout_s or None,
                              split_on_fin_rst=self.split_on_fin_rst)

    @property
    def finetune_offset(self) -> int:
        """Bytes cut from the front of each packet for fine-tuning (38 for `etbert`, else 0)."""
        return ETBERT_FINETUNE_OFFSET if self.header_policy == "etbert" else 0

    def tokenizer_block(self, vocab: Vocab) -> dict:
        """Return the manifest's `tokenizer` block."""
        block = vocab.to_manifest()
        block.update({
            "header_policy": self.header_policy,
            "bytes_per_packet": self.bytes_per_packet,
            "tokens_per_packet": self.tokens_per_packet,
            "packets_per_flow": self.packets_per_flow,
            "finetune_offset": self.finetune_offset,
        })
        return block


def stable_hash(text: str) -> int:
    """Return a 64-bit hash of `text` that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# ---- pre-training ------------------------------------------------------------------------------

class BurstHalves(NamedTuple):
    """The two sub-BURSTs of one BURST and where it came from (use `BurstHalves.of` to build one)."""

    # Unique, sortable id: "<unit>#<session index>#<burst number>".
    key: str
    # Id of the BURST's session, unique across the whole job.
    session: str
    # First ceil(n / 2) bytes of the BURST.
    a: bytes
    # Remaining floor(n / 2) bytes.
    b: bytes
    # `stable_hash(key)`: picks the BURST's pairing bucket and its place in the bucket.
    digest: int

    @classmethod
    def of(cls, key: str, session: str, a: bytes, b: bytes) -> BurstHalves:
        """Return the halves with their digest computed from `key`."""
        return cls(key, session, a, b, stable_hash(key))

    def bucket(self, buckets: int) -> int:
        """Return the pairing bucket of this BURST among `buckets`."""
        return self.digest % buckets


def split_burst(data: bytes) -> tuple[bytes, bytes]:
    """Cut a BURST's bytes into byte-aligned halves at ceil(n / 2)."""
    middle = (len(data) + 1) // 2
    return data[:middle], data[middle:]


def iter_burst_halves(paths: Sequence[str], names: Sequence[str], unit: str, settings: ConvertSettings,
                      stats: SkipCounter, counts: Counter,
                      on_format_error: Callable[[str, CaptureFormatError], None] | None = None,
                      ) -> Iterator[BurstHalves]:
    """Yield the sub-BURST pairs of one capture unit (a file or a series read as one stream).

    `counts` receives `sessions`, `bursts` and `bursts_too_short`; `stats` the packet accounting.
    """
    event_lists = iter_session_event_lists(
        paths, settings.session_options, settings.header_policy, stats=stats, names=names,
        on_format_error=on_format_error, keep_bytes_burst=settings.bytes_per_packet, keep_packets_flow=0,
        keep_bytes_flow=0)
    counts["bursts_too_short"] += 0  # present in the manifest even when no BURST is too short
    for events in event_lists:
        bursts = [event for event in events if event.__class__ is Burst]
        counts["sessions"] += sum(1 for event in events if event.__class__ is SessionEnd)
        counts["bursts"] += len(bursts)
        # Session ids of this list's BURSTs, built once per session.
        session_ids: dict[int, str] = {}
        for burst in bursts:
            data = b"".join(burst.packets)
            if len(data) < 4:
                counts["bursts_too_short"] += 1
                continue
            a, b = split_burst(data)
            session = session_ids.get(burst.session_index)
            if session is None:
                session = session_ids[burst.session_index] = f"{unit}#{burst.session_index:09d}"
            key = f"{session}#{burst.number:09d}"
            # `BurstHalves.of` without its Python-level constructor: this runs once per BURST.
            yield _new_tuple(BurstHalves, (key, session, a, b, stable_hash(key)))


def pair_bucket(bursts: Iterable[BurstHalves], bucket: int, settings: ConvertSettings,
                counts: Counter) -> list[tuple[BurstHalves, bytes, int]]:
    """Build SBP pairs inside one bucket: return (BURST, B half, sbp_label) per BURST.

    BURSTs are ordered by their digest (a hash of their key), so neighbours come from unrelated captures. With a RNG
    seeded by (seed, bucket), a fraction `negative_ratio` is chosen for negatives. A chosen BURST takes
    the B half of the next BURST in that order (wrapping around) from a different session. When the
    bucket contains no other session it stays positive and counts as `negatives_unavailable`.
    """
    ordered = sorted(bursts, key=_BY_DIGEST)
    size = len(ordered)
    if size == 0:
        return []
    codes: dict[str, int] = {}
    sessions = np.array([codes.setdefault(item.session, len(codes)) for item in ordered], dtype=np.int64)
    partners = _next_other_session(sessions).tolist()

    rng = random.Random(f"{settings.seed}:pairs:{bucket}")
    chosen = [rng.random() < settings.negative_ratio for _ in range(size)]
    negative = [choose and partner >= 0 for choose, partner in zip(chosen, partners)]
    pairs = [(item, ordered[partner].b, 1) if is_negative else (item, item.b, 0)
             for item, partner, is_negative in zip(ordered, partners, negative)]

    negatives = sum(negative)
    counts["positives"] += size - negatives
    counts["negatives"] += negatives
    counts["negatives_unavailable"] += sum(chosen) - negatives
    return pairs


@numba.njit(cache=True)
def _next_other_session(sessions):
    """Return, for each position, the first position after it round the ring with another session (-1: none).

    Two backward passes cover the wrap, so the search is linear in the bucket size.
    """
    size = sessions.shape[0]
    following_other = np.full(size, -1, dtype=np.int64)
    for step in range(2 * size - 1, -1, -1):
        position = step % size
        following = (position + 1) % size
        if sessions[following] != sessions[position]:
            following_other[position] = following
        else:
            following_other[position] = following_other[following]
    return following_other


@numba.njit(cache=True)
def truncate_pair(length_a, length_b, max_total):
    """Return the lengths BERT's truncate_seq_pair leaves: drop from the longer (B on ties) until both fit."""
    excess = length_a + length_b - max_total
    if excess <= 0:
        return length_a, length_b
    gap = abs(length_a - length_b)
    if excess <= gap:
        if length_a > length_b:
            return length_a - excess, length_b
        return length_a, length_b - excess
    equal = min(length_a, length_b)
    rest = excess - gap
    return equal - rest // 2, equal - (rest + 1) // 2


def pretrain_instance(ids_a: np.ndarray, ids_b: np.ndarray, vocab: Vocab,
                      seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (input_ids, segment_ids) of `[CLS] A [SEP] B [SEP]`, at most `seq_len` long."""
    keep_a, keep_b = truncate_pair(len(ids_a), len(ids_b), seq_len - 3)
    second = keep_a + 2  # position of B's first token
    input_ids = np.empty(second + keep_b + 1, dtype=np.int64)
    input_ids[0] = vocab.cls_id
    input_ids[1:second - 1] = ids_a[:keep_a]
    input_ids[second - 1] = vocab.sep_id
    input_ids[second:-1] = ids_b[:keep_b]
    input_ids[-1] = vocab.sep_id
    segment_ids = np.full(len(input_ids), 2, dtype=np.int64)
    segment_ids[:second] = 1
    return input_ids, segment_ids


def pretrain_example_bytes(burst: BurstHalves, b_half: bytes, label: int, vocab: Vocab,
                           settings: ConvertSettings) -> bytes:
    """Tokenize one SBP pair and serialize it as a pre-training `tf.train.Example`."""
    return pretrain_examples_bytes([(burst, b_half, label)], vocab, settings)[0]


def pretrain_instances(pairs: Sequence[tuple[BurstHalves, bytes, int]], vocab: Vocab,
                       seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (input_ids, segment_ids, lengths) of many SBP pairs, one padded row each.

    Row i equals `pretrain_instance(vocab.encode(a_i), vocab.encode(b_i), vocab, seq_len)` in its first
    `lengths[i]` columns; one compiled loop builds all rows.
    """
    count = len(pairs)
    blob, starts, sizes = pack_bytes([half for burst, b_half, _ in pairs for half in (burst.a, b_half)])
    input_ids = np.full((count, seq_len), vocab.pad_id, dtype=np.int64)
    segment_ids = np.zeros((count, seq_len), dtype=np.int64)
    lengths = np.zeros(count, dtype=np.int64)
    _pair_rows(blob, starts, sizes, vocab.offsets, vocab.pieces, vocab.cls_id, vocab.sep_id, input_ids,
               segment_ids, lengths)
    return input_ids, segment_ids, lengths


@numba.njit(cache=True)
def _pair_rows(blob, starts, sizes, offsets, pieces, cls_id, sep_id, input_ids, segment_ids, lengths):
    """Build `[CLS] A [SEP] B [SEP]` rows; halves 2i and 2i + 1 of the packed buffer are A and B of row i."""
    room = input_ids.shape[1] - 3
    for row in range(lengths.shape[0]):
        a, b = 2 * row, 2 * row + 1
        full_a = pieces_count(blob, starts[a], sizes[a], offsets)
        full_b = pieces_count(blob, starts[b], sizes[b], offsets)
        keep_a, keep_b = truncate_pair(full_a, full_b, room)
        ids = input_ids[row]
        ids[0] = cls_id
        write_tokens(blob, starts[a], sizes[a] - 1, offsets, pieces, keep_a, ids, 1)
        ids[keep_a + 1] = sep_id
        write_tokens(blob, starts[b], sizes[b] - 1, offsets, pieces, keep_b, ids, keep_a + 2)
        length = keep_a + keep_b + 3
        ids[length - 1] = sep_id
        segment_ids[row, : keep_a + 2] = 1
        segment_ids[row, keep_a + 2 : length] = 2
        lengths[row] = length


def pretrain_examples_bytes(pairs: Sequence[tuple[BurstHalves, bytes, int]], vocab: Vocab,
                            settings: ConvertSettings) -> list[bytes]:
    """Tokenize SBP pairs (BURST, B half, label) and serialize each as a pre-training `tf.train.Example`."""
    examples = []
    # Chunks keep the id, segment and output arrays small enough to stay in the processor's caches.
    for start in range(0, len(pairs), _PAIRS_PER_CHUNK):
        chunk = pairs[start : start + _PAIRS_PER_CHUNK]
        input_ids, segment_ids, lengths = pretrain_instances(chunk, vocab, settings.seq_len)
        labels = np.fromiter((label for _, _, label in chunk), dtype=np.int64, count=len(chunk))
        examples.extend(records.pretrain_examples(input_ids, lengths, segment_ids, labels))
    return examples


# ---- fine-tuning ------------------------------------------------------------------------------

class FinetuneExample(NamedTuple):
    """Fine-tuning example before its label and split are assigned."""

    # "packet" or "flow".
    level: str
    # Capture the session's first packet came from (a name given to the reader).
    source: str
    # Printable session, "proto client:port>server:port" (never fed to the model).
    session: str
    # Id of the session, unique across the whole job: "<unit>#<session index>".
    session_uid: str
    # 0-based position of the packet in its session; -1 for flow-level examples.
    packet_index: int
    # `[CLS]` + tokens, int64.
    input_ids: np.ndarray
    # ET-BERT's text of the example (space-separated 4-hex bigram words), or "" unless requested.
    text: str = ""

    @property
    def uid(self) -> str:
        """Id of the example, unique across the whole job."""
        return f"{self.level}|{self.session_uid}|{self.packet_index}"


def finetune_bytes(data: bytes, settings: ConvertSettings) -> bytes:
    """Return the bytes of one packet that fine-tuning tokenizes (ET-BERT drops 38 bytes)."""
    return data[settings.finetune_offset:]


def packet_tokens(data: bytes, vocab: Vocab, settings: ConvertSettings) -> np.ndarray:
    """Return the first `tokens_per_packet` tokens of one packet's fine-tuning bytes."""
    ids, lengths = packet_tokens_many([data], vocab, settings)
    return ids[0, : lengths[0]]


def packet_tokens_many(packets: Sequence[bytes], vocab: Vocab, settings: ConvertSettings,
                       first_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (tokens (n, tokens_per_packet), lengths) of many packets, as `packet_tokens` per row.

    With `first_id`, each row starts with that id (see `Vocab.encode_many`).
    """
    offset = settings.finetune_offset
    datas = [data[offset:] for data in packets] if offset else packets
    return vocab.encode_many(datas, settings.tokens_per_packet, first_id)


def packet_input_ids(data: bytes, vocab: Vocab, settings: ConvertSettings) -> np.ndarray:
    """Return `[CLS]` + the first `tokens_per_packet` tokens of a packet, cut to `packet_seq_len`."""
    ids, lengths = packet_input_ids_many([data], vocab, settings)
    return ids[0, : lengths[0]]


def packet_input_ids_many(packets: Sequence[bytes], vocab: Vocab,
                          settings: ConvertSettings) -> tuple[np.ndarray, np.ndarray]:
    """Return (input ids, lengths) of many packet-level examples, as `packet_input_ids` per row."""
    ids, lengths = packet_tokens_many(packets, vocab, settings, first_id=vocab.cls_id)
    width = min(settings.tokens_per_packet + 1, settings.packet_seq_len)
    return ids[:, :width], np.minimum(lengths, width)


def flow_input_ids(packets: Sequence[bytes], vocab: Vocab, settings: ConvertSettings) -> np.ndarray:
    """Return `[CLS]` + the tokens of the first `packets_per_flow` packets, cut to `flow_seq_len`."""
    ids, lengths = flow_input_ids_many([packets], vocab, settings)
    return ids[0, : lengths[0]]


def flow_input_ids_many(flows: Sequence[Sequence[bytes]], vocab: Vocab,
                        settings: ConvertSettings) -> tuple[np.ndarray, np.ndarray]:
    """Return (input ids, lengths) of many flows (each a list of packets), as `flow_input_ids` per row."""
    firsts = [packets[: settings.packets_per_flow] for packets in flows]
    tokens, counts = packet_tokens_many([data for packets in firsts for data in packets], vocab, settings)
    packets_per_flow = np.fromiter(map(len, firsts), dtype=np.int64, count=len(firsts))
    ids = np.full((len(firsts), settings.flow_seq_len), vocab.pad_id, dtype=np.int64)
    lengths = np.zeros(len(firsts), dtype=np.int64)
    _join_flows(tokens, counts, packets_per_flow, vocab.cls_id, ids, lengths)
    return ids, lengths


@numba.njit(cache=True)
def _join_flows(tokens, counts, packets_per_flow, cls_id, ids, lengths):
    """Write `[CLS]` and the tokens of each flow's packets (consecutive rows of `tokens`), cut to the row width."""
    width = ids.shape[1]
    row = 0
    for flow in range(packets_per_flow.shape[0]):
        line = ids[flow]
        line[0] = cls_id
        length = 1
        for _ in range(packets_per_flow[flow]):
            for column in range(counts[row]):
                if length == width:
                    break
                line[length] = tokens[row, column]
                length += 1
            row += 1
        lengths[flow] = length


def _text(packets: Sequence[bytes], settings: ConvertSettings) -> str:
    """Return ET-BERT's TSV text: each packet's first `tokens_per_packet` bigram words, space-separated."""
    words: list[str] = []
    for data in packets:
        words.extend(bigram_words(finetune_bytes(data, settings), settings.tokens_per_packet))
    return " ".join(words)


def iter_finetune_examples(paths: Sequence[str], settings: ConvertSettings, vocab: Vocab,
                           names: Sequence[str] | None = None, unit: str | None = None,
                           levels: Sequence[str] = LEVELS, stats: SkipCounter | None = None,
                           counts: Counter | None = None, with_text: bool = False,
                           on_format_error: Callable[[str, CaptureFormatError], None] | None = None,
                           ) -> Iterator[FinetuneExample]:
    """Yield packet- and flow-level examples of one capture unit, in capture order.

    `unit` names the unit in session ids (default: the first name). Examples without a single token
    are counted as `examples_empty` in `counts` and skipped; `counts["sessions"]` counts sessions.
    """
    for batch in iter_finetune_batches(paths, settings, vocab, names, unit, levels, stats, counts, with_text,
                                       on_format_error):
        yield from batch


def iter_finetune_batches(paths: Sequence[str], settings: ConvertSettings, vocab: Vocab,
                          names: Sequence[str] | None = None, unit: str | None = None,
                          levels: Sequence[str] = LEVELS, stats: SkipCounter | None = None,
                          counts: Counter | None = None, with_text: bool = False,
                          on_format_error: Callable[[str, CaptureFormatError], None] | None = None,
                          ) -> Iterator[list[FinetuneExample]]:
    """Yield the examples of `iter_finetune_examples` as lists, one per batch of packets read.

    The tokens of a whole list are computed together, which is what makes conversion fast.
    """
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise ValueError(f"unknown example levels {unknown}; expected a subset of {LEVELS}")
    names = list(names) if names is not None else [str(p) for p in paths]
    unit = unit if unit is not None else names[0]
    stats = stats if stats is not None else SkipCounter()
    counts = counts if counts is not None else Counter()
    packet_bytes = settings.finetune_offset + settings.tokens_per_packet + 1
    with_flows = "flow" in levels
    event_lists = iter_session_event_lists(
        paths, settings.session_options, settings.header_policy, stats=stats, names=names,
        on_format_error=on_format_error, keep_bytes_burst=0,
        keep_packets_flow=settings.packets_per_flow if with_flows else 0, keep_bytes_flow=packet_bytes,
        emit_packets="packet" in levels, keep_bytes_packet=packet_bytes,
        max_packets_per_session=settings.max_packets_per_session)

    for events in event_lists:
        packets = [event for event in events if event.__class__ is PacketBytes]
        ends = [event.session for event in events if event.__class__ is SessionEnd]
        counts["sessions"] += len(ends)
        packet_ids, packet_lengths = packet_input_ids_many([event.data for event in packets], vocab, settings)
        packet_lengths = packet_lengths.tolist()
        if with_flows:
            flow_ids, flow_lengths = flow_input_ids_many([session.first_packets for session in ends], vocab, settings)
            flow_lengths = flow_lengths.tolist()

        examples = []
        packet_row = flow_row = 0
        for event in events:
            if event.__class__ is PacketBytes:
                length = packet_lengths[packet_row]
                ids = packet_ids[packet_row, :length]
                packet_row += 1
                # Built with tuple.__new__, which skips the Python-level constructor: this runs per packet.
                example = _new_tuple(FinetuneExample, (
                    "packet", event.source, event.session_name, f"{unit}#{event.session_index:09d}", event.number,
                    ids, _text([event.data], settings) if with_text else ""))
            elif event.__class__ is SessionEnd and with_flows:
                session = event.session
                ids = flow_ids[flow_row, : flow_lengths[flow_row]]
                flow_row += 1
                example = FinetuneExample(
                    level="flow", source=session.sources[0] if session.sources else unit, session=session.name,
                    session_uid=f"{unit}#{session.index:09d}", packet_index=-1, input_ids=ids,
                    text=_text(session.first_packets[: settings.packets_per_flow], settings) if with_text else "")
            else:
                continue
            if len(ids) < 2:
                counts[f"examples_empty_{example.level}"] += 1
                continue
            examples.append(example)
        if examples:
            yield examples


def iter_flow_examples(paths: Sequence[str], settings: ConvertSettings, vocab: Vocab | None = None,
                       stats: SkipCounter | None = None) -> Iterator[FinetuneExample]:
    """Yield the flow-level examples of captures read as one stream (used by prediction)."""
    vocab = vocab if vocab is not None else Vocab.load(settings.vocab)
    yield from iter_finetune_examples(paths, settings, vocab, levels=("flow",), stats=stats)


def iter_packet_examples(paths: Sequence[str], settings: ConvertSettings, vocab: Vocab | None = None,
                         stats: SkipCounter | None = None) -> Iterator[FinetuneExample]:
    """Yield the packet-level examples of captures read as one stream (used by prediction)."""
    vocab = vocab if vocab is not None else Vocab.load(settings.vocab)
    yield from iter_finetune_examples(paths, settings, vocab, levels=("packet",), stats=stats)


def finetune_example_bytes(example: FinetuneExample, label: int) -> bytes:
    """Serialize a fine-tuning example with its label as a `tf.train.Example`."""
    return finetune_examples_bytes([example], [label])[0]


def finetune_examples_bytes(examples: Sequence[FinetuneExample], labels: Sequence[int]) -> list[bytes]:
    """Serialize fine-tuning examples with their labels as `tf.train.Example`s, all in one pass."""
    if len(examples) != len(labels):
        raise ValueError(f"got {len(examples)} examples but {len(labels)} labels; pass one label per example")
    if not examples:
        return []
    ids = [example.input_ids for example in examples]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return records.finetune_examples(
        np.concatenate(ids), lengths, np.asarray(labels, dtype=np.int64), [example.source for example in examples],
        [example.session for example in examples],
        np.fromiter((example.packet_index for example in examples), dtype=np.int64, count=len(examples)))


def content_digest(input_ids: np.ndarray) -> str:
    """Return a hex digest of the final token ids, the key of cross-split deduplication."""
    return hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes()).hexdigest()
