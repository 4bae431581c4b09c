"""Reading traffic: captures -> records -> decoded packets -> sessions, BURSTs and token bytes.

No Beam and no JAX imports here, so pipelines, prediction and tests share one capture layer.
"""

from etbert_jax.capture.decode import Packet, decode_packet, iter_packets
from etbert_jax.capture.headers import (
    ETBERT_BURST_BYTES,
    ETBERT_FINETUNE_OFFSET,
    apply_header_policy,
    etbert_burst_bytes,
    etbert_finetune_bytes,
)
from etbert_jax.capture.options import HEADER_POLICIES, SessionOptions, check_header_policy
from etbert_jax.capture.reader import CaptureFormatError, Record, iter_records
from etbert_jax.capture.sessions import (
    Burst,
    PacketBytes,
    PacketInfo,
    Session,
    SessionEnd,
    SessionTable,
    collect_sessions,
    format_endpoint,
    iter_session_event_lists,
    iter_sessions,
)
from etbert_jax.capture.stats import SkipCounter

__all__ = [
    "Burst",
    "CaptureFormatError",
    "ETBERT_BURST_BYTES",
    "ETBERT_FINETUNE_OFFSET",
    "HEADER_POLICIES",
    "Packet",
    "PacketBytes",
    "PacketInfo",
    "Record",
    "Session",
    "SessionEnd",
    "SessionOptions",
    "SessionTable",
    "SkipCounter",
    "apply_header_policy",
    "check_header_policy",
    "collect_sessions",
    "decode_packet",
    "etbert_burst_bytes",
    "etbert_finetune_bytes",
    "format_endpoint",
    "iter_packets",
    "iter_records",
    "iter_session_event_lists",
    "iter_sessions",
]
