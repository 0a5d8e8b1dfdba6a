# Shared by the sbatch templates (sourced). Finds the repository and its Python even under --export=NONE,
# where the batch script starts with no PATH and none of the submitting shell's variables.
export PATH="${PATH:-/usr/local/bin:/usr/bin:/bin}"
REPO=${SFT_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
if [ ! -f "$REPO/scripts/train.py" ]; then
  echo "error: $REPO is not the sft repository; submit from its root or set SFT_REPO" >&2
  exit 2
fi
if [ -n "${SFT_PYTHON:-}" ]; then
  PYTHON=$SFT_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
  PYTHON=$REPO/.venv/bin/python
elif [ -x "$REPO/.ci-venv/bin/python" ]; then
  PYTHON=$REPO/.ci-venv/bin/python
else
  PYTHON=$(command -v python3)
fi
if ! (cd "$REPO" && "$PYTHON" -c "import accelerate, sft.config") 2>/dev/null; then
  echo "error: $PYTHON cannot import accelerate and sft; set SFT_PYTHON to the virtualenv's python" >&2
  exit 2
fi
PORT=${SFT_PORT:-29500}
LOGS=${SFT_LOG_DIR:-$REPO/logs}
mkdir -p "$LOGS"
GPUS=${SLURM_GPUS_ON_NODE:-0}
PER_NODE=$(( GPUS > 0 ? GPUS : 1 ))
if [ "$GPUS" = 0 ]; then
  export ACCELERATE_USE_CPU=1   # no GPU on the node: CPU processes over gloo
fi
echo "sft: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?} | python $PYTHON | $PER_NODE process(es) per node" >&2
