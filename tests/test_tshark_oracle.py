"""Sessions and records against tshark: conversation tables, frame timestamps and lengths.

With every timeout and the FIN/RST split off, a session is a conversation: protocol plus the unordered
pair of endpoints. `tshark -z conv,tcp -z conv,udp` must then list the same conversations with the same
packet counts per direction.

The comparison runs on captures where both sides define conversations the same way. tshark 4.0
dissects more than the capture layer reads, and it counts differently in these cases, which the files
below do not contain:
- it adds the inner conversations of tunnels (GRE, VXLAN, GTP, Teredo);
- it counts a reassembled IP datagram at its last fragment;
- it keys IPv6 packets with a routing header by the final destination;
- it splits a TCP conversation when a port pair is reused after a new SYN;
- it reads 802.11 frames.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from etbert_jax.capture.options import SessionOptions
from etbert_jax.capture.reader import iter_records
from etbert_jax.capture.sessions import collect_sessions, iter_sessions
from etbert_jax.capture.stats import SkipCounter

pytestmark = pytest.mark.tshark

# One or more files per class, favouring files with many conversations and unusual containers.
SUBSET = [
    "malware/corelight-asyncrat-9596cf60.pcap",
    "malware/corelight-agenttesla-0e328ab7.pcap",
    "malware/chrissanders-cryptowall4-c2.pcapng",
    "quic/ndpi-quic-google-mixed.pcap",
    "quic/tcpdump-quic-handshake-null.pcap",
    "ssh/ndpi-ssh.pcap",
    "ssh/zeek-ssh-guess-bruteforce.pcap",
    "tls12/zeek-tls12-google-cert-repeat.pcap",
    "tls13/ndpi-reddit-tls13.pcap",
    "tls13/zeek-tls13-ech.pcap",
    "vpn-openvpn/ndpi-openvpn-mixed.pcap",
    "vpn-wireguard/ndpi-wireguard.pcap",
]

PROTOCOLS = {"TCP Conversations": 6, "UDP Conversations": 17}


def parse_endpoint(text: str) -> tuple[bytes, int]:
    address, port = text.rsplit(":", 1)
    return ipaddress.ip_address(address).packed, int(port)


def tshark_conversations(tshark: str, path) -> dict:
    """Return {(proto, frozenset of endpoints): {endpoint: frames sent}} from tshark's tables."""
    result = subprocess.run(
        [tshark, "-n", "-r", str(path), "-q", "-z", "conv,tcp", "-z", "conv,udp"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    conversations = {}
    proto = None
    for line in result.stdout.splitlines():
        if line.strip() in PROTOCOLS:
            proto = PROTOCOLS[line.strip()]
            continue
        if "<->" not in line:
            continue
        left, right = line.split("<->")
        fields = right.split()
        # Columns after endpoint B: frames and bytes (value and unit) towards A, then from A, then total.
        a, b = parse_endpoint(left.strip()), parse_endpoint(fields[0])
        to_a, from_a = int(fields[1]), int(fields[4])
        key = (proto, frozenset((a, b)))
        assert key not in conversations, f"tshark split {key} into several conversations"
        conversations[key] = {a: from_a, b: to_a}
    return conversations


def our_conversations(path) -> dict:
    stats = SkipCounter(warn_limit=0)
    events = iter_sessions([path], SessionOptions.conversations(), stats=stats, keep_bytes_burst=0)
    sessions, _ = collect_sessions(events)
    conversations = {}
    for session in sessions:
        key = (session.proto, frozenset((session.client, session.server)))
        assert key not in conversations, f"{session.name} appears twice"
        conversations[key] = {session.client: session.packets[0], session.server: session.packets[1]}
    return conversations


@pytest.mark.parametrize("relative", SUBSET)
def test_sessions_match_tshark_conversations(tshark_path, sample_captures, relative):
    path = sample_captures / relative
    expected = tshark_conversations(tshark_path, path)
    found = our_conversations(path)
    assert len(expected) > 0
    assert set(found) == set(expected)
    for key, counts in expected.items():
        assert found[key] == counts, key


# Files whose frames tshark lists one to one: pcapng with two timestamp resolutions, nanosecond and
# big-endian pcap, gzip and snaplen-cut frames.
TIMESTAMP_FILES = [
    "pcaps/edge-pcapng-multi-interface/zeek-pcapng-multi-interface.pcapng",
    "pcaps/edge-pcap-nanosecond/tcpdump-tcp-handshake-nano-sll.pcap",
    "pcaps/edge-gzip/zeek-tls-fragmented-handshake.pcap.gz",
    "hard-cases/06-big-endian-captures/bigendian_nsec.pcap",
    "hard-cases/06-big-endian-captures/bigendian_usec.pcap",
    "hard-cases/09-snaplen-truncated-tcp/snaplen96.pcap",
]


def epoch_to_ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0")[:9])


@pytest.mark.parametrize("relative", TIMESTAMP_FILES)
def test_records_match_tshark_frames(tshark_path, shared_pcaps, relative):
    path = shared_pcaps.parent / relative
    result = subprocess.run(
        [tshark_path, "-n", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len",
         "-e", "frame.cap_len"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    expected = []
    for line in result.stdout.splitlines():
        epoch, wire_len, cap_len = line.split("\t")
        expected.append((epoch_to_ns(epoch), int(wire_len), int(cap_len)))
    found = [(r.ts_ns, r.wire_len, len(r.data)) for r in iter_records(path)]
    assert len(found) == len(expected)
    assert found == expected
