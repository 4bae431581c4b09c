"""Throughput and peak memory of the conversion core against two references measured in the same run.

What runs, on the same list of capture files (the bundled captures repeated until the list contains at
least `--min-packets` packets):

- `ours-pretrain`: capture -> sessions -> BURSTs -> SBP pairs -> token ids -> serialized pre-training
  `tf.train.Example`s (`convert.iter_burst_halves`, `convert.pair_bucket`, `convert.pretrain_example_bytes`).
- `ours-finetune`: capture -> sessions -> packet- and flow-level token ids -> serialized fine-tuning
  examples (`convert.iter_finetune_examples`, `convert.finetune_example_bytes`).
- `dpkt-floor`: a bare loop that reads every record with `dpkt.pcap.Reader` / `dpkt.pcapng.Reader`
  (chosen by magic bytes) and decodes its link layer (`dpkt.ethernet.Ethernet` for Ethernet,
  `dpkt.loopback.Loopback` for BSD loopback). It builds no sessions and no tokens, so it is the floor.
- `scapy-etbert`: ET-BERT's original preprocessing style: `scapy.all.rdpcap` reads the whole file, each
  packet is hex-encoded with `binascii.hexlify(bytes(pkt))`, its first 38 bytes are cut off as ET-BERT's
  fine-tuning does, and its first 128 overlapping 4-hex-character bigrams are joined with spaces.
  It stops at that text. ET-BERT's `get_feature_packet` also copies each packet before `bytes()` and
  then runs UER's WordPiece tokenizer over the text, so this reference is faster than ET-BERT's code.

Each run of a method happens in a fresh child process that imports only what that method needs, so
one method's imports and garbage never slow another down (scapy alone brings about 100,000 Python
objects, which every full garbage collection then scans). The child first runs the method once,
untimed, on one capture of each format, which loads the compiled numba kernels (or compiles them on
a fresh checkout). Then it times one run over the whole workload. Methods run `--repeats` times,
round-robin, so background load hits all of them alike; the ratios use the best run of each. Every
file is its own conversion unit, so repeated copies never share sessions.

Peak memory: the core runs in a subprocess on one capture (`--rss-capture`, default the classic pcap
with the most packets) and on a copy of it concatenated `--rss-copies` times, with each copy's
timestamps shifted past the session timeouts. The subprocess reports its peak RSS and, in a second
run, the tracemalloc peak of Python allocations (numpy arrays included). Peak RSS is the kernel's
VmHWM of the child. Streaming conversion keeps both flat as the capture grows.

For the throughput runs `ours-pretrain` groups the BURSTs of the whole workload into the pipeline's
hash buckets and pairs each bucket, computing what the Beam pipeline computes. The Beam runner keeps
one bucket in memory at a time, but one process keeping all buckets grows with the input, so the
memory test pairs consecutive chunks of `--bucket-size` BURSTs instead.

NOTE: the memory test's chunked pairing draws negatives from nearby sessions only, so its examples
differ from the pipeline's; it measures memory, not example quality.

Usage (from the repository root):
    .venv/bin/python bench/bench_convert.py --min-packets 200000 --repeats 3 --json /tmp/bench_convert.json
"""

from __future__ import annotations

import argparse
import binascii
import json
import logging
import os
import pathlib
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from etbert_jax import convert  # noqa: E402
from etbert_jax.capture import SkipCounter, iter_records  # noqa: E402
from etbert_jax.tokenizer import Vocab  # noqa: E402

log = logging.getLogger("bench_convert")

DEFAULT_CAPTURES = REPO_ROOT / "data" / "sample-captures"
PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# Bytes ET-BERT cuts from the front of a packet for fine-tuning: Ethernet, IPv4 and the two ports.
ETBERT_CUT_BYTES = 38
# Bigram tokens ET-BERT keeps per packet for fine-tuning.
ETBERT_TOKENS_PER_PACKET = 128
# Gap added between concatenated copies of the memory-test capture. It is longer than the default idle
# (120 s) and active (3600 s) session timeouts, so no session spans two copies.
COPY_GAP_NS = 2 * 3600 * 1_000_000_000
# The timed methods, in the order of each round.
METHODS = ("dpkt-floor", "ours-pretrain", "ours-finetune", "scapy-etbert")
# DLT numbers the dpkt floor decodes.
DLT_NULL = 0
DLT_EN10MB = 1


# ---- inputs --------------------------------------------------------------------------------------

def list_captures(root: pathlib.Path) -> list[pathlib.Path]:
    """Return the pcap and pcapng files under `root` (by magic bytes, sorted); gzip files are left out."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic in PCAP_MAGICS or magic == PCAPNG_MAGIC:
            found.append(path)
    if not found:
        raise SystemExit(f"no pcap or pcapng files under {root}; pass --captures DIR with captures in it")
    return found


def repeat_to(paths: Sequence[pathlib.Path], counts: dict[pathlib.Path, int],
              min_packets: int) -> list[pathlib.Path]:
    """Repeat the whole file list until it contains at least `min_packets` packets."""
    per_pass = sum(counts[path] for path in paths)
    if per_pass == 0:
        raise SystemExit("the captures hold no packets; pass --captures DIR with non-empty captures")
    passes = max(1, -(-min_packets // per_pass))
    return list(paths) * passes


# ---- the references ----------------------------------------------------------------------------

def _dpkt_reader(handle):
    import dpkt

    magic = handle.read(4)
    handle.seek(0)
    if magic == PCAPNG_MAGIC:
        return dpkt.pcapng.Reader(handle)
    return dpkt.pcap.Reader(handle)


def run_dpkt_floor(paths: Sequence[pathlib.Path]) -> int:
    """Read every record with dpkt and decode its link layer; return the packet count."""
    import dpkt

    packets = 0
    for path in paths:
        with open(path, "rb") as handle:
            reader = _dpkt_reader(handle)
            link = dpkt.loopback.Loopback if reader.datalink() == DLT_NULL else dpkt.ethernet.Ethernet
            for _, buf in reader:
                link(buf)
                packets += 1
    return packets


def dpkt_count(path: pathlib.Path) -> int:
    """Return the number of records dpkt reads from `path`; raise SystemExit when dpkt cannot read it."""
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in _dpkt_reader(handle))
    except Exception as error:  # dpkt raises several unrelated types on unreadable files
        raise SystemExit(f"dpkt cannot read {path} ({error}); pass --captures DIR without it") from error


def etbert_bigram_text(hex_text: str, max_tokens: int) -> str:
    """Build ET-BERT's bigram text: overlapping 4-hex-character words, each followed by a space.

    Written in the style of ET-BERT's `bigram_generation`: the hex string is cut into one-byte
    pieces, and neighbouring pieces are concatenated one token at a time.
    """
    pieces = [hex_text[i:i + 2] for i in range(0, len(hex_text), 2)]
    text = ""
    for i in range(min(len(pieces) - 1, max_tokens)):
        text += pieces[i] + pieces[i + 1] + " "
    return text


def import_scapy() -> Callable:
    """Return `scapy.all.rdpcap`, with scapy's own warnings silenced."""
    try:
        logging.getLogger("scapy").setLevel(logging.ERROR)
        from scapy.all import rdpcap
    except ImportError as error:
        raise SystemExit("scapy is not installed: run `.venv/bin/pip install -r requirements-test.txt`") from error
    return rdpcap


def run_scapy_etbert(paths: Sequence[pathlib.Path], rdpcap: Callable) -> int:
    """Tokenize every packet to ET-BERT's bigram text with scapy; return the packet count."""
    packets = 0
    hex_cut = 2 * ETBERT_CUT_BYTES
    for path in paths:
        for packet in rdpcap(str(path)):
            hex_text = binascii.hexlify(bytes(packet)).decode()
            etbert_bigram_text(hex_text[hex_cut:], ETBERT_TOKENS_PER_PACKET)
            packets += 1
    return packets


# ---- our conversion core -------------------------------------------------------------------------

def run_ours_finetune(paths: Sequence[pathlib.Path], settings: convert.ConvertSettings, vocab: Vocab) -> int:
    """Convert every file to serialized packet- and flow-level examples; return the packets read."""
    stats = SkipCounter()
    for path in paths:
        for examples in convert.iter_finetune_batches([str(path)], settings, vocab, stats=stats):
            convert.finetune_examples_bytes(examples, [0] * len(examples))
    return stats.packets_read


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_ours_pretrain(paths: Sequence[pathlib.Path], settings: convert.ConvertSettings, vocab: Vocab,
                      bucket_size: int | None = None) -> int:
    """Convert every file to serialized SBP pre-training pairs; return the packets read.

    With `bucket_size` None, BURSTs are grouped into `settings.pair_buckets` hash buckets over the
    whole workload and each bucket is paired, as the Beam pipeline's GroupByKey does. Memory then
    grows with the workload. With a `bucket_size`, consecutive chunks of that many BURSTs are paired
    as they arrive, which keeps memory bounded.
    """
    stats, counts = SkipCounter(), Counter()

    def halves() -> Iterator[convert.BurstHalves]:
        for index, path in enumerate(paths):
            # The index keeps session ids of repeated copies of one file apart.
            unit = f"{index}:{path}"
            yield from convert.iter_burst_halves([str(path)], [str(path)], unit, settings, stats, counts)

    if bucket_size is None:
        buckets: dict[int, list[convert.BurstHalves]] = {}
        for item in halves():
            bucket = item.bucket(settings.pair_buckets)
            buckets.setdefault(bucket, []).append(item)
        groups = sorted(buckets.items())
    else:
        groups = enumerate(_chunks(halves(), bucket_size))

    for bucket, group in groups:
        convert.pretrain_examples_bytes(convert.pair_bucket(group, bucket, settings, counts), vocab, settings)
    return stats.packets_read


# ---- throughput ----------------------------------------------------------------------------------

def time_methods(names: Sequence[str], repeats: dict[str, int], child_args: list[str]) -> dict[str, dict]:
    """Run the methods round-robin, each run in a fresh child process; return packets, timings and packets/s.

    A child imports only what its method needs, warms it up untimed on the first capture and times one
    run over the whole workload (see `time_child`).
    """
    seconds: dict[str, list[float]] = {name: [] for name in names}
    packets: dict[str, int] = {}
    for round_index in range(max(repeats.values())):
        for name in names:
            if round_index >= repeats[name]:
                continue
            command = [sys.executable, __file__, "--time-child", name, *child_args]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"timing {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            seconds[name].append(result["seconds"])
            packets[name] = result["packets"]
            log.info("round %d %-14s %8d packets in %7.2f s (%9.0f packets/s)",
                     round_index + 1, name, result["packets"], result["seconds"],
                     result["packets"] / result["seconds"])

    results = {}
    for name, times in seconds.items():
        results[name] = {
            "packets": packets[name],
            "seconds": times,
            "best_packets_per_s": packets[name] / min(times),
            "median_packets_per_s": packets[name] / statistics.median(times),
        }
    return results


def warm_up_files(files: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """Return the first capture of each format (by magic bytes), so a warm-up touches every code path."""
    firsts: dict[bytes, pathlib.Path] = {}
    for path in files:
        with open(path, "rb") as handle:
            firsts.setdefault(handle.read(4), path)
    return list(firsts.values())


def method_runner(name: str, files: Sequence[pathlib.Path], workload: Sequence[pathlib.Path]) -> Callable[[], int]:
    """Import what method `name` needs; warm it up untimed on one capture per format; return the timed run."""
    warm_up = warm_up_files(files)
    if name == "dpkt-floor":
        run_dpkt_floor(warm_up)
        return lambda: run_dpkt_floor(workload)
    if name == "scapy-etbert":
        rdpcap = import_scapy()
        run_scapy_etbert(warm_up, rdpcap)
        return lambda: run_scapy_etbert(workload, rdpcap)

    # Warm-up loads the compiled numba kernels of the capture layer and the record encoders (or, on a
    # fresh checkout, compiles them).
    settings, vocab = convert.ConvertSettings(), Vocab.default()
    if name == "ours-pretrain":
        run_ours_pretrain(warm_up, settings, vocab)
        return lambda: run_ours_pretrain(workload, settings, vocab)
    if name == "ours-finetune":
        run_ours_finetune(warm_up, settings, vocab)
        return lambda: run_ours_finetune(workload, settings, vocab)
    raise SystemExit(f"unknown method {name!r}; expected one of {METHODS}")


def time_child(name: str, files: Sequence[pathlib.Path], workload: Sequence[pathlib.Path]) -> None:
    """Time one run of method `name` in this process and print {"packets", "seconds"} as one JSON line."""
    run = method_runner(name, files, workload)
    start = time.perf_counter()
    count = run()
    print(json.dumps({"packets": count, "seconds": time.perf_counter() - start}))


def profile_method(name: str, method: Callable[[], int], top: int) -> list[dict]:
    """Run `method` once under cProfile; print and return its `top` functions by own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    method()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items():
        where = os.path.relpath(filename, REPO_ROOT) if filename.startswith(str(REPO_ROOT)) else filename
        rows.append({"function": f"{where}:{line}({function})", "calls": calls, "own_s": own,
                     "own_share": own / total, "cumulative_share": cumulative / total})
    rows.sort(key=lambda row: row["own_s"], reverse=True)

    print(f"\nprofile of {name}: {total:.2f} s under cProfile; top {top} functions by own time")
    print(f"{'own %':>7}{'cum %':>7}{'calls':>10}  function")
    for row in rows[:top]:
        print(f"{100 * row['own_share']:>7.1f}{100 * row['cumulative_share']:>7.1f}{row['calls']:>10}  {row['function']}")
    return rows[:top]


# ---- peak memory ---------------------------------------------------------------------------------

def write_repeated_pcap(source: pathlib.Path, destination: pathlib.Path, copies: int) -> int:
    """Write `source` `copies` times into one nanosecond pcap, shifting each copy's timestamps.

    Copy k is shifted by k * (capture span + `COPY_GAP_NS`), so its sessions start after every
    session of copy k - 1 has timed out. Returns the number of records written.
    """
    records = list(iter_records(source, stats=SkipCounter(warn_limit=0)))
    if not records:
        raise SystemExit(f"{source} has no packets; pass --rss-capture with a non-empty pcap")
    linktypes = {record.linktype for record in records}
    if len(linktypes) != 1:
        raise SystemExit(f"{source} mixes link types {sorted(linktypes)}, but a classic pcap has only one: "
                         "pass --rss-capture with a single-link-type capture")
    first = min(record.ts_ns for record in records)
    shift = max(record.ts_ns for record in records) - first + COPY_GAP_NS
    snaplen = 262144

    with open(destination, "wb") as out:
        # Little-endian nanosecond pcap header: magic, version 2.4, zone, sigfigs, snaplen, link type.
        out.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, snaplen, linktypes.pop()))
        for copy in range(copies):
            for record in records:
                seconds, nanoseconds = divmod(record.ts_ns + copy * shift, 1_000_000_000)
                out.write(struct.pack("<IIII", seconds, nanoseconds, len(record.data), record.wire_len))
                out.write(record.data)
    return copies * len(records)


def pick_rss_capture(paths: Sequence[pathlib.Path], counts: dict[pathlib.Path, int]) -> pathlib.Path:
    """Return the classic pcap with the most packets (a pcapng may mix link types)."""
    classic = []
    for path in paths:
        with open(path, "rb") as handle:
            if handle.read(4) in PCAP_MAGICS:
                classic.append(path)
    if not classic:
        raise SystemExit("no classic pcap among the captures; pass --rss-capture PATH")
    return max(classic, key=lambda path: (counts[path], str(path)))


def _status_kb(field: str) -> int:
    """Return a memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field} line; the memory test needs Linux")


def rss_child(path: str, kind: str, bucket_size: int, use_tracemalloc: bool) -> None:
    """Convert one capture in this process and print its memory figures as one JSON line."""
    settings, vocab = convert.ConvertSettings(), Vocab.default()
    after_imports_kb = _status_kb("VmRSS")
    if use_tracemalloc:
        import tracemalloc

        tracemalloc.start()
    if kind == "pretrain":
        packets = run_ours_pretrain([pathlib.Path(path)], settings, vocab, bucket_size)
    else:
        packets = run_ours_finetune([pathlib.Path(path)], settings, vocab)
    # VmHWM is the peak resident set of this process image. ru_maxrss is not used, because Linux
    # carries it over execve from the forked parent, so a child would report the parent's peak.
    result = {"packets": packets, "after_imports_kb": after_imports_kb, "peak_rss_kb": _status_kb("VmHWM")}
    if use_tracemalloc:
        result["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    print(json.dumps(result))


def measure_child(path: pathlib.Path, kind: str, bucket_size: int, use_tracemalloc: bool) -> dict:
    """Run `rss_child` in a fresh interpreter and return what it printed."""
    command = [sys.executable, __file__, "--rss-child", str(path), "--rss-kind", kind,
               "--bucket-size", str(bucket_size)]
    if use_tracemalloc:
        command.append("--tracemalloc")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory subprocess for {path} ({kind}) failed with exit code {done.returncode}:\n"
                         f"{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(capture: pathlib.Path, copies: int, bucket_size: int) -> dict:
    """Measure peak memory of both paths on `capture` and on it concatenated `copies` times."""
    results: dict = {"capture": str(capture), "copies": copies}
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as folder:
        repeated = pathlib.Path(folder) / f"repeated-{copies}x.pcap"
        results["packets_1x"] = write_repeated_pcap(capture, pathlib.Path(folder) / "single.pcap", 1)
        results["packets_nx"] = write_repeated_pcap(capture, repeated, copies)
        single = pathlib.Path(folder) / "single.pcap"
        for kind in ("pretrain", "finetune"):
            row = {}
            for label, path in (("1x", single), ("nx", repeated)):
                plain = measure_child(path, kind, bucket_size, use_tracemalloc=False)
                traced = measure_child(path, kind, bucket_size, use_tracemalloc=True)
                row[label] = {"peak_rss_kb": plain["peak_rss_kb"], "after_imports_kb": plain["after_imports_kb"],
                              "tracemalloc_peak_bytes": traced["tracemalloc_peak_bytes"],
                              "packets": plain["packets"]}
            row["peak_rss_ratio"] = row["nx"]["peak_rss_kb"] / row["1x"]["peak_rss_kb"]
            row["tracemalloc_ratio"] = row["nx"]["tracemalloc_peak_bytes"] / row["1x"]["tracemalloc_peak_bytes"]
            results[kind] = row
    return results


# ---- report --------------------------------------------------------------------------------------

def print_report(throughput: dict[str, dict], memory: dict | None, files: int, passes_packets: int) -> None:
    """Print packets/s per method, the ratios against both references and the memory figures."""
    print(f"\nworkload: {files} file reads, {passes_packets} packets per method run")
    print(f"{'method':<15}{'packets':>10}{'runs':>6}{'best pkt/s':>14}{'median pkt/s':>14}")
    for name, row in throughput.items():
        print(f"{name:<15}{row['packets']:>10}{len(row['seconds']):>6}"
              f"{row['best_packets_per_s']:>14,.0f}{row['median_packets_per_s']:>14,.0f}")

    print("\nratios (best packets/s):")
    for ours in ("ours-pretrain", "ours-finetune"):
        for reference, target in (("dpkt-floor", 1.0), ("scapy-etbert", 25.0)):
            if ours in throughput and reference in throughput:
                ratio = throughput[ours]["best_packets_per_s"] / throughput[reference]["best_packets_per_s"]
                verdict = "meets" if ratio >= target else "below"
                print(f"  {ours} / {reference}: {ratio:6.2f}  (target >= {target:g}: {verdict})")

    if memory is not None:
        print(f"\npeak memory on {memory['capture']} ({memory['packets_1x']} packets) and on "
              f"{memory['copies']} copies of it ({memory['packets_nx']} packets):")
        for kind in ("pretrain", "finetune"):
            row = memory[kind]
            print(f"  ours-{kind}: peak RSS {row['1x']['peak_rss_kb'] / 1024:.1f} MiB -> "
                  f"{row['nx']['peak_rss_kb'] / 1024:.1f} MiB (ratio {row['peak_rss_ratio']:.3f}; "
                  f"{row['1x']['after_imports_kb'] / 1024:.1f} MiB after imports), Python heap peak "
                  f"{row['1x']['tracemalloc_peak_bytes'] / 2**20:.2f} MiB -> "
                  f"{row['nx']['tracemalloc_peak_bytes'] / 2**20:.2f} MiB (ratio {row['tracemalloc_ratio']:.3f})")


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=pathlib.Path, default=DEFAULT_CAPTURES,
                        help="folder searched recursively for pcap/pcapng files (default: data/sample-captures)")
    parser.add_argument("--min-packets", type=int, default=200_000,
                        help="repeat the file list until it contains at least this many packets (default: 200000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of dpkt-floor and our two paths (default: 3)")
    parser.add_argument("--scapy-repeats", type=int, default=1,
                        help="timed runs of the slow scapy reference (default: 1)")
    parser.add_argument("--bucket-size", type=int, default=1024,
                        help="BURSTs per SBP pairing chunk in the memory test of ours-pretrain (default: 1024)")
    parser.add_argument("--rss-capture", type=pathlib.Path, default=None,
                        help="capture for the memory test (default: the classic pcap with the most packets)")
    parser.add_argument("--rss-copies", type=int, default=10,
                        help="copies concatenated for the larger memory run (default: 10)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one pass of the captures through each of our paths and "
                             "print the N functions with the most own time (default: 0, no profile)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show the capture layer's skipped-packet warnings")
    parser.add_argument("--time-child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-kind", choices=("pretrain", "finetune"), default="finetune", help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its report; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        # The bundled captures hold non-IP frames; one warning per file and run would bury the report.
        logging.getLogger("etbert_jax").setLevel(logging.ERROR)
    if args.profile < 0:
        raise SystemExit(f"--profile must be >= 0, got {args.profile}")
    for name in ("min_packets", "repeats", "scapy_repeats", "bucket_size", "rss_copies"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    if args.rss_child is not None:
        rss_child(args.rss_child, args.rss_kind, args.bucket_size, args.tracemalloc)
        return 0

    files = list_captures(args.captures)
    counts = {path: dpkt_count(path) for path in files}
    workload = repeat_to(files, counts, args.min_packets)
    total = sum(counts[path] for path in workload)
    if args.time_child is not None:
        time_child(args.time_child, files, workload)
        return 0
    log.info("%d captures, %d packets per pass; %d file reads and %d packets per method run",
             len(files), sum(counts.values()), len(workload), total)

    import_scapy()  # fail early, before any timing, when scapy is missing
    repeats = {name: args.repeats for name in METHODS}
    repeats["scapy-etbert"] = args.scapy_repeats
    child_args = ["--captures", str(args.captures), "--min-packets", str(args.min_packets)]
    throughput = time_methods(METHODS, repeats, child_args)
    settings, vocab = convert.ConvertSettings(), Vocab.default()
    mismatched = {name: row["packets"] for name, row in throughput.items() if row["packets"] != total}
    if mismatched:
        log.warning("packet counts differ from dpkt's %d: %s", total, mismatched)

    memory = None
    if not args.skip_memory:
        capture = args.rss_capture or pick_rss_capture(files, counts)
        memory = measure_memory(capture, args.rss_copies, args.bucket_size)

    print_report(throughput, memory, len(workload), total)
    profiles = {}
    if args.profile:
        profiles["ours-pretrain"] = profile_method(
            "ours-pretrain", lambda: run_ours_pretrain(files, settings, vocab), args.profile)
        profiles["ours-finetune"] = profile_method(
            "ours-finetune", lambda: run_ours_finetune(files, settings, vocab), args.profile)
    if args.json is not None:
        args.json.write_text(json.dumps({"throughput": throughput, "memory": memory, "profiles": profiles,
                                         "settings": {"min_packets": args.min_packets, "repeats": args.repeats,
                                                      "scapy_repeats": args.scapy_repeats,
                                                      "bucket_size": args.bucket_size}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
