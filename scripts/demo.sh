#!/usr/bin/env bash
# The main job end to end on the bundled real captures (what `make demo` runs):
#   1. convert captures to pre-training and fine-tuning shards (Apache Beam, DirectRunner)
#   2. pre-train the `tiny` model on 8 simulated CPU devices, with orbax checkpoints
#   3. fine-tune a flow-level classifier from that checkpoint (split by capture file)
#   4. write the evaluation report with its confusion-matrix PNG
#   5. classify the held-out test captures with `etbert predict`
# Usage: scripts/demo.sh [OUTPUT_DIR]   (default: demo-output)
set -euo pipefail

OUT="${1:-demo-output}"
CAPTURES="${DEMO_CAPTURES:-data/sample-captures}"
PRETRAIN_STEPS="${DEMO_PRETRAIN_STEPS:-150}"
FINETUNE_EPOCHS="${DEMO_FINETUNE_EPOCHS:-15}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# Eight fake CPU devices, so the demo runs a real (data, fsdp, tensor) mesh without accelerators.
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Huge pages for malloc make CPU training steps faster (etbert_jax/host_memory.py); kept if already set.
case ":${GLIBC_TUNABLES:-}:" in
  *:glibc.malloc.hugetlb=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac

banner() { printf '\n=== %s ===\n' "$1"; }
start=$(date +%s)

banner "1/5 converting $CAPTURES (Apache Beam DirectRunner)"
etbert convert-pretrain "$CAPTURES" --output "$OUT/pretrain-shards" --num-shards 8 \
    --direct_num_workers=2 --direct_running_mode=multi_processing
etbert convert-finetune "$CAPTURES" --output "$OUT/finetune-shards" --num-shards 2 \
    --direct_num_workers=2 --direct_running_mode=multi_processing

banner "2/5 pre-training the tiny model for $PRETRAIN_STEPS steps"
etbert pretrain --config tiny --data "$OUT/pretrain-shards" --workdir "$OUT/pretrain" \
    "train.steps=$PRETRAIN_STEPS" mesh.data=4 mesh.fsdp=2 mesh.tensor=1

banner "3/5 fine-tuning a flow classifier from the pre-training checkpoint"
etbert finetune --init "$OUT/pretrain" --data "$OUT/finetune-shards" --workdir "$OUT/finetune" \
    --level flow "finetune.epochs=$FINETUNE_EPOCHS" finetune.early_stopping_patience=6 \
    finetune.class_weights=balanced

banner "4/5 evaluating on the test split"
etbert evaluate --checkpoint "$OUT/finetune" --data "$OUT/finetune-shards" --split test \
    --out "$OUT/finetune/eval"

banner "5/5 predicting on the held-out test captures"
mapfile -t HELD_OUT < <(python - "$OUT/finetune-shards/manifest.json" "$CAPTURES" <<'PY'
import json, pathlib, sys
manifest = json.loads(pathlib.Path(sys.argv[1]).read_text())
root = pathlib.Path(sys.argv[2])
files = manifest["split"].get("files_per_split")
if files is None:
    # A session split keeps no capture whole on the test side; classify every capture instead.
    print(f"split policy {manifest['split'].get('policy')}: no capture is held out whole, "
          "so prediction runs on every capture", file=sys.stderr)
    print(root)
else:
    for name in files["test"]:
        print(root / name)
PY
)
etbert predict --checkpoint "$OUT/finetune" "${HELD_OUT[@]}" --out "$OUT/predictions.csv"

elapsed=$(( $(date +%s) - start ))
banner "done in ${elapsed}s; artifacts"
cat <<TXT
pre-training shards     $OUT/pretrain-shards            (manifest.json: counts, tokenizer, shards)
fine-tuning shards      $OUT/finetune-shards            (manifest.json: split by capture file, labels.json)
pre-training run        $OUT/pretrain                   (checkpoints/, tensorboard/, metrics.jsonl, config.yaml)
fine-tuning run         $OUT/finetune                   (checkpoints/, tensorboard/, metrics.jsonl)
evaluation report       $OUT/finetune/eval/report.md    (metrics.json, confusion_matrix.png)
predictions             $OUT/predictions.csv            (one row per session of the held-out captures)
TensorBoard             tensorboard --logdir $OUT
TXT
