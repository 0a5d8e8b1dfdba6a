#!/usr/bin/env bash
# Train on one machine with as many processes as the run wants, the shape of ROLL's helper script.
#
#   bash launch/run_sft.sh configs/demo.yaml [--dotted.override value ...]
#
# Processes: one per entry of sft_train.device_mapping when the config sets it, else one per visible GPU,
# else one (CPU). Extra arguments go to scripts/train.py. Environment: PYTHON (default: python3 on PATH),
# MAIN_PROCESS_PORT (default 29500).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [overrides...]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python3}
CONFIG=$1
shift
NPROC=$(SFT_ROOT="$ROOT" "$PYTHON" - "$CONFIG" "$@" <<'PY'
import os, sys
sys.path.insert(0, os.environ["SFT_ROOT"])
from sft.config import load_config
config = load_config(sys.argv[1], sys.argv[2:])
ids = config.sft_train.device_ids()
if ids is None:
    import torch
    print(max(1, torch.cuda.device_count()))
else:
    print(len(ids))
PY
)
ARGS=(--num_processes "$NPROC" --num_machines 1 --dynamo_backend no --main_process_port "${MAIN_PROCESS_PORT:-29500}")
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export ACCELERATE_USE_CPU=1   # processes talk over gloo on CPU
  ARGS+=(--mixed_precision no)
fi
if [ "$NPROC" -gt 1 ]; then ARGS+=(--multi_gpu); fi
echo "run_sft: $NPROC process(es)" >&2
# Paths in the config and overrides stay relative to where this is run from.
exec "$PYTHON" -m accelerate.commands.launch "${ARGS[@]}" "$ROOT/scripts/train.py" --config_path "$CONFIG" "$@"
