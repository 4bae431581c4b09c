"""CPU train-step throughput of etbert-jax against a PyTorch UER-style BERT, measured in the same run.

For each (sequence length, batch size) pair this runs, in separate fresh processes:

- `jax`: etbert-jax's real pre-training step (`train.make_train_step` over `heads.PretrainModel`,
  AdamW from `optim.py`) for the `--preset` sizes, on one CPU device;
- `torch`: `bench/torch_bert.py`, the same sizes in UER's layout, with the same batch, the same
  loss (MLM / 10 + SBP), clipping and AdamW step.

Both get the same CPU set (`--threads` pins each process to the first N CPUs; PyTorch's intra-op
thread count is set to N), the same compute dtype (float32 by default, because bf16 matmuls are
emulated on most CPUs) and the same glibc malloc setting. By default (`--malloc-hugepages both`)
each framework runs with and without malloc huge pages, which etbert_jax/host_memory.py
recommends for CPU training, and the report gives the ratio per setting and between each
framework's faster setting. Every token is real (no padding); the first `--warmup` steps, which include
JAX's compilation, are not timed. The ratio JAX / PyTorch uses the median step time of each.

Usage (from the repository root; about 8 minutes on 2 CPU cores):
    .venv/bin/python bench/bench_train_step.py --seq-lens 128,512 --batch-sizes 8,2 --steps 3
Tiny smoke run:
    .venv/bin/python bench/bench_train_step.py --seq-lens 32 --batch-sizes 2 --layers 1 --hidden 32 \
        --heads 2 --ffn 64 --vocab 300 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_DIR = pathlib.Path(__file__).resolve().parent
for folder in (REPO_ROOT, BENCH_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

FRAMEWORKS = ("jax", "torch")


def _pin_threads(threads: int | None) -> int:
    """Restrict this process to the first `threads` CPUs it may use; return the CPU count in use."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads is not None:
        if not 1 <= threads <= len(allowed):
            raise SystemExit(f"--threads {threads} is outside 1..{len(allowed)}, the CPUs this process may use")
        allowed = allowed[:threads]
        os.sched_setaffinity(0, allowed)
    return len(allowed)


def _child_config(args: argparse.Namespace, seq_len: int, batch_size: int):
    from etbert_jax import config as config_lib
    from jax_step import model_overrides

    overrides = model_overrides(args.layers, args.hidden, args.heads, args.ffn, args.vocab)
    overrides += [f"data.seq_len={seq_len}", f"data.global_batch_size={batch_size}",
                  f"model.compute_dtype={args.dtype}", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"]
    if seq_len > 512:
        overrides.append(f"model.max_positions={seq_len}")
    return config_lib.load_config(args.preset, overrides)


def run_jax(args: argparse.Namespace, seq_len: int, batch_size: int, cpus: int) -> dict:
    """Time etbert-jax's train step; return the measurement as a dict."""
    import jax

    from jax_step import synthetic_batch, time_train_step

    config = _child_config(args, seq_len, batch_size)
    batch = synthetic_batch(config, batch_size, seed=args.seed)
    timing = time_train_step(config, batch, warmup_steps=args.warmup, timed_steps=args.steps)
    return {"framework": "jax", "seq_len": seq_len, "batch_size": batch_size, "cpus": cpus,
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "first_step_s": timing.first_step_s, "step_s": list(timing.step_s),
            "median_step_s": timing.median_step_s, "tokens_per_s": timing.tokens_per_s,
            "last_loss": timing.last_loss}


def run_torch(args: argparse.Namespace, seq_len: int, batch_size: int, cpus: int) -> dict:
    """Time the PyTorch reference step on the same sizes and batch; return the measurement as a dict."""
    import numpy as np
    import torch

    from jax_step import synthetic_batch
    from torch_bert import BertPretrain, TorchBertConfig, make_optimizer, train_step

    torch.set_num_threads(cpus)
    torch.manual_seed(args.seed)
    config = _child_config(args, seq_len, batch_size)
    model_config = config.model
    torch_config = TorchBertConfig(
        vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
        num_layers=model_config.num_layers, num_heads=model_config.num_heads,
        intermediate_size=model_config.intermediate_size, max_positions=model_config.max_positions,
        type_vocab_size=model_config.type_vocab_size, dropout=model_config.dropout,
        attention_dropout=model_config.attention_dropout, layer_norm_eps=model_config.layer_norm_eps,
        attention=args.torch_attention)
    model = BertPretrain(torch_config)
    optimizer = make_optimizer(model, config.optim.learning_rate, config.optim.weight_decay, config.optim.eps)
    batch = {name: torch.from_numpy(np.ascontiguousarray(value))
             for name, value in synthetic_batch(config, batch_size, seed=args.seed).items()}
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None

    times, loss = [], float("nan")
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch, mlm_weight=config.train.mbm_weight,
                          clip_norm=config.optim.grad_clip_norm, autocast_dtype=autocast)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    median = float(np.median(timed))
    return {"framework": "torch", "seq_len": seq_len, "batch_size": batch_size, "cpus": cpus,
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "attention": args.torch_attention, "first_step_s": times[0], "step_s": timed,
            "median_step_s": median, "tokens_per_s": seq_len * batch_size / median, "last_loss": loss}


def run_child(args: argparse.Namespace) -> None:
    """Measure one framework at one size and print the result as one JSON line."""
    cpus = _pin_threads(args.threads)
    runner = run_jax if args.child == "jax" else run_torch
    result = runner(args, args.child_seq_len, args.child_batch_size, cpus)
    result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    print(json.dumps(result))


def _child_env(hugepages: bool) -> dict[str, str]:
    """Environment for a measuring process: one CPU device for JAX, whatever the caller's XLA_FLAGS.

    Both frameworks get the same glibc tunables: malloc huge pages on or off (`--malloc-hugepages`).
    """
    from etbert_jax import host_memory

    env = host_memory.with_hugetlb(os.environ, hugepages)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def measure(args: argparse.Namespace, framework: str, seq_len: int, batch_size: int, hugepages: bool) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    command = [sys.executable, __file__, "--child", framework, "--child-seq-len", str(seq_len),
               "--child-batch-size", str(batch_size)] + args.forwarded
    done = subprocess.run(command, capture_output=True, text=True, env=_child_env(hugepages), check=False)
    if done.returncode != 0:
        raise SystemExit(f"{framework} measurement at seq {seq_len}, batch {batch_size} failed with exit code "
                         f"{done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["malloc_hugepages"] = "on" if hugepages else "off"
    return result


def print_report(rows: list[dict]) -> None:
    """Print tokens/s of both frameworks per size and setting, and the ratios JAX / PyTorch.

    With both malloc settings measured, the last ratio compares each framework at its faster one.
    """
    from etbert_jax import host_memory

    first = rows[0]
    torch_row = next((row for row in rows if row["framework"] == "torch"), {})
    print(f"\nCPUs per process: {first['cpus']}; torch.get_num_threads() = {torch_row.get('torch_threads')}; "
          f"torch {torch_row.get('torch_version')}, attention {torch_row.get('attention')}")
    print(f"malloc huge pages: {host_memory.HUGETLB_ON} in GLIBC_TUNABLES (on) or not (off); "
          f"kernel transparent huge pages: {host_memory.thp_mode()}")
    print(f"{'seq':>5}{'batch':>7}{'framework':>11}{'huge pages':>12}{'first step s':>14}{'median step s':>15}"
          f"{'tokens/s':>11}{'loss':>9}")
    for row in rows:
        print(f"{row['seq_len']:>5}{row['batch_size']:>7}{row['framework']:>11}{row['malloc_hugepages']:>12}"
              f"{row['first_step_s']:>14.2f}{row['median_step_s']:>15.3f}{row['tokens_per_s']:>11.1f}"
              f"{row['last_loss']:>9.3f}")

    print("\nratio JAX / PyTorch (tokens/s, target >= 1.0):")
    if {row["framework"] for row in rows} != set(FRAMEWORKS):
        print("  none: the ratio needs both frameworks (--frameworks jax,torch)")
        return
    settings = sorted({row["malloc_hugepages"] for row in rows})
    for seq_len, batch_size in sorted({(row["seq_len"], row["batch_size"]) for row in rows}):
        size_rows = [row for row in rows if (row["seq_len"], row["batch_size"]) == (seq_len, batch_size)]
        comparisons = [(f"huge pages {setting} for both", [row for row in size_rows
                                                            if row["malloc_hugepages"] == setting])
                       for setting in settings]
        if len(settings) > 1:
            comparisons.append(("each at its faster setting", size_rows))
        for label, candidates in comparisons:
            best = {}
            for row in candidates:
                if row["framework"] not in best or row["tokens_per_s"] > best[row["framework"]]["tokens_per_s"]:
                    best[row["framework"]] = row
            if set(best) == set(FRAMEWORKS):
                ratio = best["jax"]["tokens_per_s"] / best["torch"]["tokens_per_s"]
                verdict = "meets" if ratio >= 1.0 else "below"
                print(f"  seq {seq_len}, batch {batch_size}, {label}: {ratio:.2f} ({verdict} target)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser; options after the first group are forwarded to the child processes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=_int_list, default=[128, 512], help="sequence lengths (default: 128,512)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[8, 2],
                        help="batch size per sequence length, same order (default: 8,2)")
    parser.add_argument("--frameworks", default="jax,torch", help="which to run: jax, torch or both (default both)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--preset", default="base", help="config preset or YAML file for the sizes (default: base)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of both frameworks (default: float32)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default: 3)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first, compilation included (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="pin each measuring process to this many CPUs (default: all it may use)")
    parser.add_argument("--torch-attention", choices=("sdpa", "explicit"), default="sdpa",
                        help="PyTorch attention: fused scaled_dot_product_attention or UER's explicit form")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch and the weights")
    parser.add_argument("--malloc-hugepages", choices=("both", "on", "off"), default="both",
                        help="start the measuring processes with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (on, "
                             "as etbert_jax/host_memory.py recommends for CPU training), without it (off), "
                             "or measure both frameworks both ways (both, the default)")
    for name in ("layers", "hidden", "heads", "ffn", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name} (smoke runs)")
    parser.add_argument("--child", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-seq-len", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-batch-size", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the report; return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"--steps and --warmup must be >= 1, got {args.steps} and {args.warmup}")
    if args.child is not None:
        run_child(args)
        return 0

    if len(args.seq_lens) != len(args.batch_sizes):
        raise SystemExit(f"--seq-lens has {len(args.seq_lens)} values but --batch-sizes has {len(args.batch_sizes)}: "
                         "give one batch size per sequence length")
    frameworks = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown or not frameworks:
        raise SystemExit(f"--frameworks {args.frameworks!r} is invalid: choose from {', '.join(FRAMEWORKS)}")

    # Child processes get the same model, dtype, step and thread options.
    parent_only = {"--seq-lens", "--batch-sizes", "--frameworks", "--json", "--malloc-hugepages"}
    args.forwarded = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in parent_only:
            skip = "=" not in item
            continue
        args.forwarded.append(item)

    settings = {"on": [True], "off": [False], "both": [True, False]}[args.malloc_hugepages]
    rows = []
    for seq_len, batch_size in zip(args.seq_lens, args.batch_sizes):
        for hugepages in settings:
            for framework in frameworks:
                print(f"measuring {framework} at seq {seq_len}, batch {batch_size}, "
                      f"malloc huge pages {'on' if hugepages else 'off'} ...", flush=True)
                rows.append(measure(args, framework, seq_len, batch_size, hugepages))
    print_report(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
