"""Bidirectional sessions, BURSTs and per-packet bytes from decoded packets, with bounded memory.

Design. `SessionTable.add(ts_ns, packet, data, source, index)` takes packets in capture order and
returns a list of events; `flush_idle(now_ns)` and `close_all()` return the events of sessions that end.
Events are named tuples (`Burst`, `PacketBytes`) and `SessionEnd`. Tuples of plain values drop out of
the garbage collector's tracking, which keeps collections cheap while millions of events pass:

- `Burst`: a completed BURST, i.e. a maximal run of consecutive same-direction packets of one session,
  each packet's policy-applied bytes cut to `keep_bytes_burst`. It is emitted when the direction
  changes and when the session ends, so only the current BURST of each session is held in memory.
- `PacketBytes` (only with `emit_packets=True`): every packet's policy-applied bytes cut to
  `keep_bytes_packet`, for packet-level examples; `max_packets_per_session` caps them per session.
- `SessionEnd`: the finished `Session` with its counters and its first `keep_packets_flow` packets'
  bytes (cut to `keep_bytes_flow`), for flow-level examples.

Events of one session always come in capture order, and its `SessionEnd` follows its last `Burst`.
Sessions get consecutive indexes in the order of their first packet. `close_all()` ends the remaining
ones in that order too, so the same input always gives the same events in the same order.

Session rules (docs/capture-rules.md states them in full):

- Key: protocol and the unordered pair of (address, port) endpoints. VLAN tags, MPLS labels and tunnel
  headers are not part of it.
- Client: for TCP the sender of a SYN without ACK (the sender of a SYN-ACK is the server). A TCP session
  first seen mid-stream takes the endpoint with a port below 1024 as server when exactly one port is
  below 1024, and otherwise the sender of its first packet as client. Other protocols: the sender of
  the first packet.
- A session ends when no packet came for `idle_timeout_s`, when `active_timeout_s` passed since its
  first packet, and (with `split_on_fin_rst`) when it is closing, i.e. after an RST or after both sides
  sent FIN, and either a SYN without ACK arrives (it opens a new session) or `closing_grace_s` passed.
  Late packets of a closing session, such as the final ACK, stay in it.
- Idle and closing sessions are swept every `sweep_every_packets` packets as capture time advances, so
  memory grows with the number of active sessions, not with the file size.
- Retransmissions and packets without payload (pure ACKs, SYNs, FINs) are kept like any other packet.

`iter_sessions(paths, ...)` reads several files as one stream, for captures that continue in a second
file. It orders the files by their first timestamp, so the listed order does not change the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numba
import numpy as np

from etbert_jax.capture.decode import (
    ACK,
    ACK_NUMBER,
    DPORT,
    END,
    FIN,
    IP_OFFSET,
    IP_VERSION,
    L4_OFFSET,
    NUM_FIELDS,
    PAYLOAD_OFFSET,
    PROTO,
    RST,
    SEQ,
    SPORT,
    SYN,
    TCP,
    TCP_FLAGS,
    TRUNCATED,
    UDP,
    WIRE_PAYLOAD_LEN,
    Packet,
    PacketBatch,
    iter_packet_batches,
)
from etbert_jax.capture.headers import UNKNOWN_BASE, policy_rows
from etbert_jax.capture.options import SessionOptions, check_header_policy
from etbert_jax.capture.reader import CaptureFormatError, RecordBatch, iter_records
from etbert_jax.capture.stats import SkipCounter

logger = logging.getLogger(__name__)

# (address bytes, port)
Endpoint = tuple[bytes, int]
# (protocol, lower endpoint, higher endpoint): the same for both directions.
SessionKey = tuple[int, Endpoint, Endpoint]

CLIENT_TO_SERVER = 0
SERVER_TO_CLIENT = 1
# Builds a named tuple from a tuple of all its fields, without its Python-level constructor.
_new_tuple = tuple.__new__
_PROTO_NAMES = {TCP: "tcp", UDP: "udp"}


def format_endpoint(endpoint: Endpoint) -> str:
    """Return "a.b.c.d:port" or "[v6 address]:port"."""
    address, port = endpoint
    if len(address) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, address)}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, address)}]:{port}"


@dataclasses.dataclass(frozen=True, slots=True)
class PacketInfo:
    """Origin of one kept packet of a session: time, direction, file and record index."""

    # Timestamp in integer nanoseconds.
    ts_ns: int
    # 0 client to server, 1 server to client.
    direction: int
    # Source name (capture path) of the packet.
    source: str
    # Record index of the packet in its source file.
    index: int


@dataclasses.dataclass(slots=True)
class Session:
    """One bidirectional session and the bytes kept for flow-level examples."""

    # Protocol and unordered endpoint pair.
    key: SessionKey
    # Consecutive number in the order of first packets, starting at 0 for each table.
    index: int
    # 6 (TCP) or 17 (UDP).
    proto: int
    # (address bytes, port) of the client and of the server.
    client: Endpoint
    server: Endpoint
    first_ts_ns: int
    last_ts_ns: int
    # Packets per direction: [client to server, server to client].
    packets: list[int] = dataclasses.field(default_factory=lambda: [0, 0])
    # Payload bytes per direction as the headers declare them (snaplen-cut bytes included).
    payload_bytes: list[int] = dataclasses.field(default_factory=lambda: [0, 0])
    # Packets whose captured bytes end before their IP total length.
    truncated_packets: int = 0
    # Completed BURSTs.
    bursts: int = 0
    # Source names in the order the session met them.
    sources: list[str] = dataclasses.field(default_factory=list)
    # Policy-applied bytes of the first `keep_packets_flow` packets, each cut to `keep_bytes_flow`.
    first_packets: list[bytes] = dataclasses.field(default_factory=list)
    # Timestamp, direction, source and file index of each packet in `first_packets`.
    first_packet_info: list[PacketInfo] = dataclasses.field(default_factory=list)
    # Why the session ended: "idle", "active", "closed", "new_syn" or "end_of_input".
    end_reason: str = ""
    # Cache of `name`, filled on first use because most sessions are never printed.
    _name: str = dataclasses.field(default="", init=False, repr=False, compare=False)

    @property
    def client_str(self) -> str:
        return format_endpoint(self.client)

    @property
    def server_str(self) -> str:
        return format_endpoint(self.server)

    @property
    def proto_name(self) -> str:
        return _PROTO_NAMES.get(self.proto, str(self.proto))

    @property
    def name(self) -> str:
        """The session as "proto client>server", e.g. "tcp 192.0.2.10:49152>198.51.100.20:80"."""
        if not self._name:
            self._name = f"{self.proto_name} {self.client_str}>{self.server_str}"
        return self._name

    @property
    def total_packets(self) -> int:
        return self.packets[0] + self.packets[1]

    @property
    def duration_ns(self) -> int:
        return self.last_ts_ns - self.first_ts_ns


class Burst(NamedTuple):
    """A completed BURST: consecutive packets of one direction in one session."""

    session_key: SessionKey
    session_index: int
    # 0 client to server, 1 server to client.
    direction: int
    # Policy-applied bytes of each packet, cut to `keep_bytes_burst`.
    packets: tuple[bytes, ...]
    # Source name of the BURST's first packet.
    source: str
    # Timestamp of the BURST's first packet in integer nanoseconds.
    first_ts_ns: int
    # 0-based position of the BURST in its session.
    number: int = 0


class PacketBytes(NamedTuple):
    """One packet's policy-applied bytes with its session, for packet-level examples."""

    session_key: SessionKey
    session_index: int
    # 0 client to server, 1 server to client.
    direction: int
    # 0-based position of the packet in its session.
    number: int
    data: bytes
    source: str
    # Record index of the packet in its source file.
    index: int
    ts_ns: int
    # Printable session name, "proto client>server".
    session_name: str


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEnd:
    """A session that ended; no more events of it follow."""

    session: Session


Event = Burst | PacketBytes | SessionEnd


@dataclasses.dataclass(slots=True)
class _State:
    """A live session plus what is needed to finish it."""

    session: Session
    burst_direction: int = -1
    burst_packets: list[bytes] = dataclasses.field(default_factory=list)
    burst_source: str = ""
    burst_first_ts: int = 0
    # Initial sequence number per direction (the SYN's, or the first one seen).
    isn: list[int | None] = dataclasses.field(default_factory=lambda: [None, None])
    fin_seen: list[bool] = dataclasses.field(default_factory=lambda: [False, False])
    closing: bool = False
    # Which endpoint of the packed key is the client: 0 lower, 1 higher, 2 both (same address and port).
    client_side: int = 0


class SessionTable:
    """Group packets into bidirectional sessions and emit BURST, packet and session-end events."""

    def __init__(
        self,
        options: SessionOptions = SessionOptions(),
        header_policy: str = "anonymize",
        keep_bytes_burst: int = 64,
        keep_packets_flow: int = 5,
        keep_bytes_flow: int = 128,
        emit_packets: bool = False,
        keep_bytes_packet: int | None = None,
        max_packets_per_session: int | None = None,
    ) -> None:
        """Create an empty table.

        `keep_bytes_burst`: bytes kept per packet in BURSTs (0 disables `Burst` events).
        `keep_packets_flow`, `keep_bytes_flow`: packets and bytes per packet kept in `Session.first_packets`.
        `emit_packets`: emit a `PacketBytes` event per packet, cut to `keep_bytes_packet` (None keeps all)
        and at most `max_packets_per_session` per session (None for no cap).
        """
        sizes = (("keep_bytes_burst", keep_bytes_burst), ("keep_packets_flow", keep_packets_flow),
                 ("keep_bytes_flow", keep_bytes_flow), ("keep_bytes_packet", keep_bytes_packet),
                 ("max_packets_per_session", max_packets_per_session))
        for label, value in sizes:
            if value is not None and value < 0:
                raise ValueError(f"SessionTable {label} must be >= 0, got {value}")
        self.options = options
        self.header_policy = check_header_policy(header_policy)
        self.keep_bytes_burst = keep_bytes_burst
        self.keep_packets_flow = keep_packets_flow
        self.keep_bytes_flow = keep_bytes_flow
        self.emit_packets = emit_packets
        self.keep_bytes_packet = keep_bytes_packet
        self.max_packets_per_session = max_packets_per_session
        # Limits in integer nanoseconds, computed once because they are checked for every packet.
        self._idle_ns = options.idle_timeout_ns
        self._active_ns = options.active_timeout_ns
        self._grace_ns = options.closing_grace_ns
        # Live sessions by the packed key that `_session_keys` writes.
        self._live: dict[bytes, _State] = {}
        self._next_index = 0
        self._packets_since_sweep = 0
        self._now_ns = 0
        # Packets of the batch being added whose policy-applied bytes are still to be computed.
        self._pending: _PendingBytes | None = None
        # Totals over every session started so far.
        self.sessions_started = 0
        self.bursts_emitted = 0

    def __len__(self) -> int:
        """Return the number of live sessions."""
        return len(self._live)

    def add(self, ts_ns: int, packet: Packet, data: bytes, source: str = "", index: int = -1) -> list[Event]:
        """Add one decoded packet; return the events it completes, in order."""
        return self.add_batch(single_packet_batch(ts_ns, packet, data, index), source)

    def add_batch(self, batch: PacketBatch, source: str = "") -> list[Event]:
        """Add the packets of a batch in order; return the events they complete, in order."""
        count = len(batch)
        if count == 0:
            return []
        records, fields = batch.records, batch.fields
        keys = np.zeros((count, KEY_BYTES), dtype=np.uint8)
        sides = np.empty(count, dtype=np.int64)
        _session_keys(records.buf, records.start, fields, keys, sides)
        # Fixed-width byte strings drop trailing zero bytes, which keeps equal-width keys distinct.
        key_list = keys.view(f"S{KEY_BYTES}").ravel().tolist()
        side_list = sides.tolist()
        ts_list = records.ts_ns.tolist()
        index_list = records.index.tolist()
        proto_list = fields[:, PROTO].tolist()
        flag_list = fields[:, TCP_FLAGS].tolist()
        seq_list = fields[:, SEQ].tolist()
        payload_list = np.maximum(fields[:, WIRE_PAYLOAD_LEN], 0).tolist()
        truncated_list = fields[:, TRUNCATED].tolist()

        events: list[Event] = []
        pending = self._pending = _PendingBytes()
        live = self._live
        # BURSTs already open hold bytes and may receive references in this batch; a BURST opened
        # in this batch is noted when its first packet arrives.
        for state in live.values():
            if state.burst_packets:
                pending.touch(state.burst_packets, self.keep_bytes_burst)
        pending_rows, sender_bases, receiver_bases = pending.rows, pending.sender_base, pending.receiver_base
        split_on_fin_rst = self.options.split_on_fin_rst
        sweep_every = self.options.sweep_every_packets
        keep_burst = self.keep_bytes_burst
        keep_flow = self.keep_packets_flow if self.keep_bytes_flow > 0 else 0
        packet_cap = self.max_packets_per_session if self.emit_packets else 0
        if packet_cap is None:
            packet_cap = 1 << 62

        # Limits for the quick test of whether a session may have expired (no limit: never).
        idle_limit = self._idle_ns if self._idle_ns is not None else 1 << 62
        active_limit = self._active_ns if self._active_ns is not None else 1 << 62
        now_ns = self._now_ns
        since_sweep = self._packets_since_sweep

        for row in range(count):
            ts_ns = ts_list[row]
            key = key_list[row]
            flags = flag_list[row]
            is_tcp = proto_list[row] == TCP
            if ts_ns > now_ns:
                now_ns = ts_ns

            state = live.get(key)
            if state is not None:
                session = state.session
                if state.closing or ts_ns - session.last_ts_ns > idle_limit \
                        or ts_ns - session.first_ts_ns > active_limit:
                    if state.closing and flags & (SYN | ACK) == SYN:
                        reason = "new_syn"
                    else:
                        reason = self._expiry_reason(state, ts_ns)
                    if reason:
                        self._finish(key, reason, events)
                        state = None
            if state is None:
                state = self._start(key, batch, row, side_list[row])

            session = state.session
            side = side_list[row]
            direction = CLIENT_TO_SERVER if side == 2 or side == state.client_side else SERVER_TO_CLIENT
            if ts_ns > session.last_ts_ns:
                session.last_ts_ns = ts_ns
            counts = session.packets
            number = counts[0] + counts[1]
            counts[direction] += 1
            session.payload_bytes[direction] += payload_list[row]
            session.truncated_packets += truncated_list[row]
            if source and source not in session.sources:
                session.sources.append(source)
            isn = state.isn
            if is_tcp and isn[direction] is None:
                isn[direction] = seq_list[row]

            if keep_burst or number < keep_flow or number < packet_cap:
                # Queue the packet for the header-policy kernel (inlined `_PendingBytes.add`).
                ref = len(pending_rows)
                pending_rows.append(row)
                base = isn[direction]
                sender_bases.append(UNKNOWN_BASE if base is None else base)
                base = isn[1 - direction]
                receiver_bases.append(UNKNOWN_BASE if base is None else base)
                index = index_list[row]
                if number < keep_flow:
                    session.first_packets.append(ref)
                    session.first_packet_info.append(PacketInfo(ts_ns, direction, source, index))
                    pending.touch(session.first_packets, self.keep_bytes_flow)
                if keep_burst:
                    if state.burst_packets and state.burst_direction != direction:
                        self._emit_burst(state, events)
                    if not state.burst_packets:
                        state.burst_direction = direction
                        state.burst_source = source
                        state.burst_first_ts = ts_ns
                        pending.touch(state.burst_packets, keep_burst)
                    state.burst_packets.append(ref)
                if number < packet_cap:
                    pending.packet_events.append(len(events))
                    # A plain tuple with the reference in place of `data`, until `resolve` builds the event.
                    events.append((session.key, session.index, direction, number, ref, source, index, ts_ns,
                                   session.name))

            if is_tcp and split_on_fin_rst:
                if flags & RST:
                    state.closing = True
                if flags & FIN:
                    state.fin_seen[direction] = True
                    if all(state.fin_seen):
                        state.closing = True

            since_sweep += 1
            if since_sweep >= sweep_every:
                self.flush_idle(now_ns, events)
                since_sweep = 0

        self._now_ns = now_ns
        self._packets_since_sweep = since_sweep
        self._pending = None
        pending.resolve(self, batch, events)
        return events

    def flush_idle(self, now_ns: int, events: list[Event] | None = None) -> list[Event]:
        """End sessions that are idle, past their active timeout or closed, as of capture time `now_ns`.

        The events are appended to `events` when given (and returned).
        """
        self._packets_since_sweep = 0
        events = events if events is not None else []
        for key in list(self._live):
            reason = self._expiry_reason(self._live[key], now_ns)
            if reason:
                self._finish(key, reason, events)
        return events

    def close_all(self) -> list[Event]:
        """End every live session in the order of their first packets."""
        events: list[Event] = []
        for key in sorted(self._live, key=lambda k: self._live[k].session.index):
            self._finish(key, "end_of_input", events)
        return events

    # -----------------------------------------------------------------------------------------------

    def _start(self, key: bytes, batch: PacketBatch, row: int, side: int) -> _State:
        """Start a session whose first packet is row `row` of `batch`."""
        packet = batch.packet(row)
        sender: Endpoint = (packet.src, packet.sport)
        receiver: Endpoint = (packet.dst, packet.dport)
        client, server = _pick_client(packet, sender, receiver)
        if side == 2:
            client_side = 2
        else:
            client_side = side if client == sender else 1 - side
        session = Session(
            key=(packet.proto, *sorted((sender, receiver))), index=self._next_index, proto=packet.proto,
            client=client, server=server, first_ts_ns=int(batch.records.ts_ns[row]),
            last_ts_ns=int(batch.records.ts_ns[row]),
        )
        self._next_index += 1
        self.sessions_started += 1
        state = _State(session=session, client_side=client_side)
        self._live[key] = state
        return state

    def _expiry_reason(self, state: _State, now_ns: int) -> str:
        session = state.session
        idle_ns = now_ns - session.last_ts_ns
        if state.closing and idle_ns > self._grace_ns:
            return "closed"
        if self._idle_ns is not None and idle_ns > self._idle_ns:
            return "idle"
        if self._active_ns is not None and now_ns - session.first_ts_ns > self._active_ns:
            return "active"
        return ""

    def _emit_burst(self, state: _State, events: list[Event]) -> None:
        session = state.session
        fields = (session.key, session.index, state.burst_direction, state.burst_packets, state.burst_source,
                  state.burst_first_ts, session.bursts)
        if self._pending is not None:
            # The list may still hold references to packets of the current batch, so the event stays
            # a plain tuple of its fields until `resolve` builds it with a tuple of bytes.
            self._pending.burst_events.append(len(events))
            events.append(fields)
        else:
            events.append(_new_tuple(Burst, fields[:3] + (tuple(state.burst_packets),) + fields[4:]))
        session.bursts += 1
        self.bursts_emitted += 1
        state.burst_packets = []

    def _finish(self, key: bytes, reason: str, events: list[Event]) -> None:
        state = self._live.pop(key)
        if state.burst_packets:
            self._emit_burst(state, events)
        state.session.end_reason = reason
        events.append(SessionEnd(state.session))


class _PendingBytes:
    """Packets of one batch whose policy-applied bytes are computed together when the batch ends.

    While a batch is added, lists of packet bytes (BURSTs, first packets of sessions) hold an int,
    the packet's position here, in place of its bytes. `resolve` computes every packet's bytes with
    one call of the header-policy kernel and puts them in place.
    """

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.sender_base: list[int] = []
        self.receiver_base: list[int] = []
        # Lists holding references, by id, with the bytes each keeps per packet (None keeps all).
        self.lists: dict[int, tuple[list, int | None]] = {}
        # Positions in the event list of `Burst` events with a list of packets, and of plain tuples
        # that become `PacketBytes` events.
        self.burst_events: list[int] = []
        self.packet_events: list[int] = []

    def add(self, row: int, sender_base: int | None, receiver_base: int | None) -> int:
        """Queue one packet; return its reference."""
        self.rows.append(row)
        self.sender_base.append(UNKNOWN_BASE if sender_base is None else sender_base)
        self.receiver_base.append(UNKNOWN_BASE if receiver_base is None else receiver_base)
        return len(self.rows) - 1

    def touch(self, items: list, keep: int | None) -> None:
        """Note that `items` holds references that `resolve` must replace."""
        self.lists[id(items)] = (items, keep)

    def resolve(self, table: SessionTable, batch: PacketBatch, events: list[Event]) -> None:
        """Compute the queued packets' bytes and replace every reference with them."""
        if not self.rows:
            return
        keeps = [keep for _, keep in self.lists.values()]
        if self.packet_events:
            keeps.append(table.keep_bytes_packet)
        width = None if None in keeps else max(keeps)
        out, lengths = policy_rows(
            table.header_policy, batch, np.array(self.rows, dtype=np.int64),
            np.array(self.sender_base, dtype=np.int64), np.array(self.receiver_base, dtype=np.int64), width)
        blob = out.tobytes()
        row_width = out.shape[1]
        kept_bytes = [blob[j * row_width : j * row_width + length] for j, length in enumerate(lengths.tolist())]

        # An int in a pending list is a row of `kept_bytes`. It is replaced by those bytes, cut to `keep`.
        for items, keep in self.lists.values():
            for position, item in enumerate(items):
                if item.__class__ is int:
                    data = kept_bytes[item]
                    items[position] = data if keep is None else data[:keep]
        for position in self.burst_events:
            key, session_index, direction, packets, source, first_ts_ns, number = events[position]
            events[position] = _new_tuple(Burst, (key, session_index, direction, tuple(packets), source, first_ts_ns,
                                                  number))
        keep = table.keep_bytes_packet
        for position in self.packet_events:
            key, session_index, direction, number, ref, source, index, ts_ns, name = events[position]
            data = kept_bytes[ref] if keep is None else kept_bytes[ref][:keep]
            events[position] = _new_tuple(PacketBytes, (key, session_index, direction, number, data, source, index,
                                                        ts_ns, name))


def single_packet_batch(ts_ns: int, packet: Packet, data: bytes, index: int = -1) -> PacketBatch:
    """Return a one-packet `PacketBatch` of a decoded packet and its frame."""
    row = np.zeros((1, NUM_FIELDS), dtype=np.int64)
    values = {IP_OFFSET: packet.ip_offset, IP_VERSION: packet.ip_version, PROTO: packet.proto,
              SPORT: packet.sport, DPORT: packet.dport, L4_OFFSET: packet.l4_offset,
              PAYLOAD_OFFSET: packet.payload_offset, END: packet.end, TCP_FLAGS: packet.tcp_flags,
              SEQ: packet.seq, ACK_NUMBER: packet.ack, TRUNCATED: int(packet.truncated),
              WIRE_PAYLOAD_LEN: packet.wire_payload_len}
    for column, value in values.items():
        row[0, column] = value
    one = np.ones(1, dtype=np.int64)
    records = RecordBatch(
        buf=np.frombuffer(data, dtype=np.uint8), start=np.zeros(1, dtype=np.int64),
        caplen=one * len(data), wire_len=one * len(data), linktype=-one, ts_ns=one * ts_ns,
        index=one * index, offset=-one)
    return PacketBatch(records, row)


# Bytes of a packed session key: IP version, protocol, then the lower and the higher endpoint, each
# a 16-byte address (IPv4 zero-padded) and a 2-byte port.
KEY_BYTES = 38


@numba.njit(cache=True)
def _session_keys(buf, starts, fields, keys, sides):
    """Write each packet's packed session key and which endpoint sent it (0 lower, 1 higher, 2 both)."""
    for row in range(starts.shape[0]):
        base = starts[row]
        ip = fields[row, IP_OFFSET]
        version = fields[row, IP_VERSION]
        size = 4 if version == 4 else 16
        src = base + ip + (12 if version == 4 else 8)
        dst = src + size
        sport = fields[row, SPORT]
        dport = fields[row, DPORT]
        order = 0
        for k in range(size):
            if buf[src + k] != buf[dst + k]:
                order = -1 if buf[src + k] < buf[dst + k] else 1
                break
        if order == 0 and sport != dport:
            order = -1 if sport < dport else 1
        if order <= 0:
            low, low_port, high, high_port = src, sport, dst, dport
        else:
            low, low_port, high, high_port = dst, dport, src, sport
        key = keys[row]
        key[0] = version
        key[1] = fields[row, PROTO]
        for k in range(size):
            key[2 + k] = buf[low + k]
            key[20 + k] = buf[high + k]
        key[18] = low_port >> 8
        key[19] = low_port & 0xFF
        key[36] = high_port >> 8
        key[37] = high_port & 0xFF
        if order < 0:
            sides[row] = 0
        elif order > 0:
            sides[row] = 1
        else:
            sides[row] = 2


def _pick_client(packet: Packet, sender: Endpoint, receiver: Endpoint) -> tuple[Endpoint, Endpoint]:
    """Return (client, server) for a session whose first packet is `packet`."""
    if packet.proto == TCP:
        flags = packet.tcp_flags
        if flags & (SYN | ACK) == SYN:
            return sender, receiver
        if flags & (SYN | ACK) == SYN | ACK:
            return receiver, sender
        sender_low = packet.sport < 1024
        receiver_low = packet.dport < 1024
        if sender_low and not receiver_low:
            return receiver, sender
    return sender, receiver


def iter_sessions(
    paths: Iterable[str | os.PathLike],
    options: SessionOptions = SessionOptions(),
    header_policy: str = "anonymize",
    stats: SkipCounter | None = None,
    names: Iterable[str] | None = None,
    sort_by_first_timestamp: bool = True,
    on_format_error: Callable[[str, CaptureFormatError], None] | None = None,
    **table_args,
) -> Iterator[Event]:
    """Yield the events of several capture files read as one stream.

    With `sort_by_first_timestamp`, files are read in the order of their first packet's timestamp, and
    ties and files without packets keep the given order. A capture series then gives the same sessions
    whatever order it is listed in. Without it, files are read in the given order. `names` labels each path in
    events and warnings (default: the path). `table_args` go to `SessionTable`. A file that is not a
    capture raises `reader.CaptureFormatError`, unless `on_format_error(name, error)` is given: then it
    is called and the file is left out.
    """
    for events in iter_session_event_lists(paths, options, header_policy, stats, names, sort_by_first_timestamp,
                                           on_format_error, **table_args):
        yield from events


def iter_session_event_lists(
    paths: Iterable[str | os.PathLike],
    options: SessionOptions = SessionOptions(),
    header_policy: str = "anonymize",
    stats: SkipCounter | None = None,
    names: Iterable[str] | None = None,
    sort_by_first_timestamp: bool = True,
    on_format_error: Callable[[str, CaptureFormatError], None] | None = None,
    **table_args,
) -> Iterator[list[Event]]:
    """Yield the events of `iter_sessions`, in the same order, as one list per batch of packets."""
    stats = stats if stats is not None else SkipCounter()
    table = SessionTable(options, header_policy, **table_args)
    paths = list(paths)
    labels = list(names) if names is not None else [os.fspath(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"iter_sessions got {len(paths)} paths but {len(labels)} names; pass one name per path")
    files = list(zip(paths, labels))
    if sort_by_first_timestamp and len(files) > 1:
        first = [_first_timestamp(path) for path, _ in files]
        order = sorted(range(len(files)), key=lambda i: (first[i] is None, first[i] or 0, i))
        files = [files[i] for i in order]

    for path, label in files:
        try:
            for batch in iter_packet_batches(path, label, stats):
                events = table.add_batch(batch, label)
                if events:
                    yield events
        except CaptureFormatError as err:
            if on_format_error is None:
                raise
            logger.warning("%s: not a readable capture, left out: %s", label, err.reason)
            on_format_error(label, err)
    yield table.close_all()


def _first_timestamp(path: str | os.PathLike) -> int | None:
    """Return the timestamp of a capture's first record, or None if it has none or is unreadable."""
    try:
        for record in iter_records(path, stats=SkipCounter(warn_limit=0)):
            return record.ts_ns
    except CaptureFormatError:
        return None
    return None


def collect_sessions(events: Iterable[Event]) -> tuple[list[Session], list[Burst]]:
    """Return the sessions (in order of first packet) and BURSTs of an event stream."""
    sessions: list[Session] = []
    bursts: list[Burst] = []
    for event in events:
        if isinstance(event, SessionEnd):
            sessions.append(event.session)
        elif isinstance(event, Burst):
            bursts.append(event)
    sessions.sort(key=lambda s: s.index)
    return sessions, bursts
