#!/usr/bin/env bash
# GPU check: a Qwen2.5-0.5B-shaped model (random init) in bf16 with SDPA (flash-attention when installed),
# sequence_length 4096, 20 steps of scripts/train.py; prints tokens/s, MFU (against 790 TFLOP/s bf16) and
# peak memory. Then packed vs padded training on variable-length samples, and the packed-vs-unpacked
# loss check in bf16 (bench/packing_check.py), and resume: a run stopped by SIGTERM after its step-6
# checkpoint and resumed vs the same run straight through (losses per step, final weights). Without a
# GPU it runs all of it at tiny size on the CPU.
#
#   bash bench/gpu_check.sh            # SIZE=tiny SEQ=256 STEPS=4 BATCH=2 for a quick CPU run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the sft package of this checkout (the GPU image has no editable install)
if [ -d .whl ] && ! python3 -c "import datasets, simple_parsing" 2>/dev/null; then
  # The lent GPU machine has no network: missing packages travel as wheels (see the device notes).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  SIZE=${SIZE:-0.5b}; SEQ=${SEQ:-4096}; STEPS=${STEPS:-20}; BATCH=${BATCH:-4}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
else
  SIZE=${SIZE:-tiny}; SEQ=${SEQ:-256}; STEPS=${STEPS:-4}; BATCH=${BATCH:-2}
  echo "no GPU: running the check at tiny size on the CPU"
fi
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXX)}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python3 bench/gpu_check.py --out "$WORK" --size "$SIZE" --sequence_length "$SEQ" --steps "$STEPS" --batch "$BATCH"
report() {  # the last logging window of a run, past the first steps' warm-up
python3 - "$1" "$2" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[2]) if "perf/tokens_per_second" in line]
last = rows[-1]
print(f"gpu_check {sys.argv[1]}: steps {last['step']} | tokens/s {last['perf/tokens_per_second']:,.0f} | "
      f"mfu {last.get('perf/mfu', float('nan')):.1%} | pad {last['perf/padding_ratio']:.1%} | "
      f"peak memory {last['memory/peak_gib']:.1f} GiB | step {1000 * last['time/step']:.0f} ms")
PY
}
if [ "${ONLY:-}" != resume ]; then  # ONLY=resume runs the resume check alone
python3 scripts/train.py --config_path "$WORK/run.yaml" 2>&1 | grep -v "it/s\]\|s/it\]" || true
# Packed vs padded on variable-length samples (64 .. SEQ tokens), same model and steps.
for mode in padded packed; do
  python3 scripts/train.py --config_path "$WORK/$mode.yaml" 2>&1 | grep -E "^step|packed|summary" || true
done
report "fixed-${SEQ}" "$WORK/run/logs/metrics.jsonl"
report "padded-variable" "$WORK/padded/logs/metrics.jsonl"
report "packed-variable" "$WORK/packed/logs/metrics.jsonl"
python3 bench/packing_check.py
fi
# Resume on this device: 12 steps straight (twice: the device's own run-to-run noise) vs stopped by
# SIGTERM once checkpoint-6 is complete, then resumed.
resume_args=(--logging_steps 1 --save_steps 6 --sft_train.training_args.max_steps 12)
rm -rf "$WORK/straight" "$WORK/again" "$WORK/stopped"  # a reused WORK must not hand back old checkpoints
for name in straight again; do
  python3 scripts/train.py --config_path "$WORK/run.yaml" --output_dir "$WORK/$name" --logging_dir "$WORK/$name/logs" \
    "${resume_args[@]}" >"$WORK/$name.log" 2>&1
done
python3 scripts/train.py --config_path "$WORK/run.yaml" --output_dir "$WORK/stopped" --logging_dir "$WORK/stopped/logs" \
  "${resume_args[@]}" >"$WORK/stopped.log" 2>&1 &
pid=$!
until [ -e "$WORK/stopped/sft_train/checkpoint-6/COMPLETE" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.05; done
kill -TERM $pid 2>/dev/null || true
wait $pid || true
python3 scripts/train.py --config_path "$WORK/run.yaml" --output_dir "$WORK/stopped" --logging_dir "$WORK/stopped/logs" \
  "${resume_args[@]}" --resume_from_checkpoint true >"$WORK/resumed.log" 2>&1 || { tail -20 "$WORK/resumed.log"; exit 1; }
resumed_at=$(grep -o "resumed from .*checkpoint-[0-9]*" "$WORK/resumed.log" | grep -o "[0-9]*$" || true)
if [ -z "$resumed_at" ] || [ "$resumed_at" -ge 12 ]; then
  echo "resume_check: FAILED, the stopped run did not stop before step 12 or did not resume: ${resumed_at:-no resume}"
  exit 1
fi
echo "resumed from checkpoint-$resumed_at"
python3 - "$WORK" <<'PY'
import json, os, sys
import torch
from safetensors.torch import load_file
work = sys.argv[1]
def losses(name):
    rows = [json.loads(line) for line in open(os.path.join(work, name, "logs", "metrics.jsonl"))]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
def weights(name):
    folder = os.path.join(work, name, "sft_train", "checkpoint-12")
    model = next(os.path.join(folder, d) for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d != "training_state")
    return {k: v.double() for k, v in load_file(os.path.join(model, "model.safetensors")).items()}
base_losses, base = losses("straight"), weights("straight")
total = sum(float(v.norm()) ** 2 for v in base.values()) ** 0.5
for name in ("again", "stopped"):
    other_losses, other = losses(name), weights(name)
    loss_diff = max(abs(base_losses[s] - other_losses[s]) / abs(base_losses[s]) for s in base_losses)
    if all(torch.equal(base[k], other[k]) for k in base):
        weights_text = "bitwise equal"
    else:
        overall = sum(float((base[k] - other[k]).norm()) ** 2 for k in base) ** 0.5 / total
        worst = max(base, key=lambda k: float((base[k] - other[k]).norm() / base[k].norm().clamp_min(1e-30)))
        worst_diff = float((base[worst] - other[worst]).norm() / base[worst].norm().clamp_min(1e-30))
        weights_text = f"rel diff {overall:.2e} overall, largest {worst_diff:.2e} ({worst}, norm {float(base[worst].norm()):.2e})"
    label = "straight run again" if name == "again" else "stopped + resumed"
    print(f"resume_check {label} vs straight: max loss rel diff {loss_diff:.2e} | final weights {weights_text}")
PY
