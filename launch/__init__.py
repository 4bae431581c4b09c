"""Launchers for `etbert pretrain` on TPU VMs, GKE (xpk), SLURM GPU clusters and one local machine.

Launchers hold no training logic: they prepare machines and environments, then run the same
`etbert pretrain` command that a single machine runs. Run them from the repository root, for
example `python -m launch.tpu_vm --help`. Every launcher accepts `--dry-run`, which prints the
commands it would run, one per line, and runs nothing.
"""
