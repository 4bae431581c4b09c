"""Accelerator train-step throughput and model FLOPs utilisation (MFU) of the `base` preset.

Runs etbert-jax's real pre-training step (see `bench/jax_step.py`) on every local accelerator with a
data-parallel mesh. The defaults are `base` sizes, sequence length 512, bf16 compute and
`--per-chip-batch` 32 sequences per chip. Attention dropout is 0, so attention runs the preset's
`model.attention_implementation` kernel ("xla": `model.masked_softmax_attention`, not flash
attention), and the MLM decoder sees only the gathered masked positions. Warm-up steps (compilation included) are not timed.

MFU = training FLOPs per token x tokens/s / (peak bf16 FLOP/s per chip x chips). The FLOP model and
the peak table are `etbert_jax/flops.py`: model FLOPs only (p = mask_prob of the positions reach the
decoder, no rematerialisation). A device kind missing from the peak table prints no MFU.

On a machine without an accelerator the script exits with status 2, unless `--allow-cpu` is given,
which is meant for tiny smoke runs (e.g. `--preset tiny --seq-len 32 --per-chip-batch 2`).

Usage (one GPU/TPU host; every host of a multi-host slice runs the same command):
    python bench/bench_gpu_mfu.py --per-chip-batch 32 --steps 20 --warmup 3 --json /tmp/mfu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_DIR = pathlib.Path(__file__).resolve().parent
for folder in (REPO_ROOT, BENCH_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# Exit status when no accelerator is present and --allow-cpu was not given.
EXIT_NO_ACCELERATOR = 2


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", help="config preset or YAML file (default: base)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--per-chip-batch", type=int, default=32, help="sequences per chip per step (default: 32)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute dtype; parameters stay float32 (default: bfloat16)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default: 3)")
    parser.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on CPU anyway (smoke runs with tiny sizes; no MFU is printed for CPUs)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results to this JSON file")
    for name in ("layers", "hidden", "heads", "ffn", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name} (smoke runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print tokens/s and MFU; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("seq_len", "per_chip_batch", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import jax

    backend = jax.default_backend()
    if backend == "cpu" and not args.allow_cpu:
        print("bench_gpu_mfu: no GPU or TPU found (JAX backend is 'cpu'). Run it on an accelerator host with "
              "jax[cuda12] or jax[tpu] installed, or pass --allow-cpu with tiny sizes for a smoke run.",
              file=sys.stderr)
        return EXIT_NO_ACCELERATOR

    from etbert_jax import config as config_lib
    from etbert_jax import flops
    from jax_step import model_overrides, synthetic_batch, time_train_step

    chips = jax.device_count()
    global_batch = args.per_chip_batch * chips
    overrides = model_overrides(args.layers, args.hidden, args.heads, args.ffn, args.vocab)
    overrides += [f"data.seq_len={args.seq_len}", f"data.global_batch_size={global_batch}",
                  f"model.compute_dtype={args.dtype}", "model.attention_dropout=0.0", f"model.remat={args.remat}",
                  "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"]
    config = config_lib.load_config(args.preset, overrides)

    # Each process builds its local rows; make_global_batch assembles the global array.
    local_rows = global_batch // jax.process_count()
    batch = synthetic_batch(config, local_rows, seed=jax.process_index())
    timing = time_train_step(config, batch, warmup_steps=args.warmup, timed_steps=args.steps)

    tokens_per_s = global_batch * args.seq_len / timing.median_step_s
    flops_per_token = flops.training_flops_per_token(config.model, args.seq_len, config.data.mask_prob)
    device_kind = jax.devices()[0].device_kind
    utilisation = flops.mfu(flops_per_token, tokens_per_s, chips, device_kind)

    result = {
        "backend": backend, "device_kind": device_kind, "chips": chips, "processes": jax.process_count(),
        "preset": args.preset, "seq_len": args.seq_len, "per_chip_batch": args.per_chip_batch,
        "global_batch": global_batch, "dtype": args.dtype, "remat": args.remat,
        "first_step_s": timing.first_step_s, "median_step_s": timing.median_step_s,
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_chip": tokens_per_s / chips,
        "flops_per_token": flops_per_token, "mfu": utilisation, "last_loss": timing.last_loss,
    }
    if jax.process_index() == 0:
        print(f"{device_kind} x {chips} ({backend}), preset {args.preset}, seq {args.seq_len}, "
              f"global batch {global_batch} ({args.per_chip_batch} per chip), {args.dtype}")
        print(f"first step (compile) {timing.first_step_s:.1f} s; median step {timing.median_step_s * 1e3:.1f} ms "
              f"over {args.steps} steps; loss {timing.last_loss:.3f}")
        print(f"tokens/s: {tokens_per_s:,.0f} total, {tokens_per_s / chips:,.0f} per chip")
        print(f"model FLOPs per token: {flops_per_token / 1e9:.3f} GFLOP")
        if utilisation is None:
            print(f"MFU: n/a (no peak FLOP/s for device kind {device_kind!r} in etbert_jax/flops.py)")
        else:
            print(f"MFU: {100 * utilisation:.1f} % (target >= 55 % on H100/H200)")
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
