"""The `etbert` command: a thin dispatcher to each job's own `main(argv)`.

Each subcommand lives in the module that implements it, so the same functions are callable
from tests and notebooks. Modules are imported only when their subcommand runs, which keeps
`etbert convert-pretrain` free of JAX start-up and `etbert pretrain` free of Beam start-up.
"""

import importlib
import sys

# Subcommand -> (module, one-line help). Each module defines `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "convert-pretrain": ("pipelines.convert_pretrain", "captures -> pre-training TFRecord shards (Beam)"),
    "convert-finetune": ("pipelines.convert_finetune", "labeled capture tree -> fine-tuning shards (Beam)"),
    "pretrain": ("etbert_jax.train", "pre-train with MBM + SBP over a device mesh"),
    "finetune": ("etbert_jax.finetune", "fine-tune a classifier from a checkpoint"),
    "evaluate": ("etbert_jax.evaluate", "evaluation report for a fine-tuned checkpoint"),
    "predict": ("etbert_jax.predict", "classify sessions or packets of raw captures"),
    "import-etbert": ("etbert_jax.importer", "convert ET-BERT's PyTorch weights to an orbax checkpoint"),
}


def _usage() -> str:
    lines = ["usage: etbert SUBCOMMAND [options]", "", "subcommands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<18} {help_text}")
    lines.append("")
    lines.append("Run `etbert SUBCOMMAND --help` for the options of one subcommand.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2

    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"etbert: unknown subcommand {name!r}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2

    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
