#!/usr/bin/env bash
# The GPU suite in one device call (10 minutes): ours padded / packed with varlen /
# ZeRO-3 vs TRL's SFTTrainer at its best settings, on Qwen2.5-1.5B- and 0.5B-shaped models (random init, bf16,
# 4096-token rows) over ShareGPT and Alpaca data with the Qwen2.5 tokenizer, ours vs TRL on a Qwen3-MoE-shaped
# model (router loss on), plus gpu_check.sh's resume check; first, bench/gpu_families.py's bf16 packed-vs-alone
# check for gpt-oss-, Gemma-3-, Qwen3-Next- and Qwen3-MoE-shaped models.
# Per case: tokens/s, MFU, peak GPU memory; then the goals (varlen MFU >= 40% on 1.5B; ours >= 1.3x TRL) as
# PASS/FAIL. The table goes to $OUT/gpu_suite.md (+ .json, + this run's log) after every case. bench/gpu_suite.py
# says what each case and number is.
#
#   bash bench/gpu_suite.sh --prepare      # HERE, once: wheels into .whl/, data into .gpu_data/ (both git-ignored)
#   bash bench/gpu_suite.sh                # on the GPU machine; device call: carry [".whl", ".gpu_data"], timeout 600
#   bash bench/gpu_suite.sh --dry-run      # CPU: tiny model, 2 steps, the same driver and report (also: no GPU)
#   bash bench/gpu_suite.sh --cases varlen,trl --budget_s 300     # some cases; other options: gpu_suite.py --help
#
# The GPU image has torch, transformers (older), accelerate, tokenizers, pandas, pyarrow, but no datasets, dill,
# multiprocess, simple-parsing, deepspeed (+ hjson, pydantic), trl or liger-kernel, and no network: they travel as
# wheels in .whl/ (the device notes' convention, also read by gpu_check.sh) and are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
SUITE_STARTED=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The GPU image installs wheels, not this checkout: the sft package is found from the repository root.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${WHEELS:-.whl}
DATA=${GPU_DATA:-.gpu_data}
# Exact pins (one version of each: two stop the install). transformers 5.24.0 is the project's pin (the image has an
# older one); typing-extensions is pydantic's floor. liger-kernel is optional (TRL's layer kernels).
WHEEL_SPECS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 simple-parsing==0.1.9 docstring-parser==0.18.0
  deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 transformers==5.24.0 trl==1.16.0 peft==0.21.2
  liger-kernel==0.8.5)

prepare() {  # on a machine with the package registry and ../shared/data; nothing here needs a GPU
  mkdir -p "$WHEELS"
  for spec in "${WHEEL_SPECS[@]}"; do
    name=${spec%%==*}; version=${spec##*==}
    file_name=$(echo "$name" | tr '-' '_')
    if ls "$WHEELS"/"${file_name}"-"${version}"-*.whl >/dev/null 2>&1; then continue; fi
    if [ "$name" = deepspeed ]; then  # an sdist on PyPI: build its (pure-Python) wheel here
      python3 -m pip wheel -q --no-deps -w "$WHEELS" "$spec" || { echo "prepare: could not build $spec"; exit 1; }
    else
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "$spec" \
        || { echo "prepare: could not download $spec"; exit 1; }
    fi
  done
  shared=${SFT_SHARED_DATA:-../shared/data}
  mkdir -p "$DATA/datasets" "$DATA/tokenizers"
  cp "$shared/datasets/alpaca_en_demo.json" "$shared/datasets/sharegpt_v3_sample_1000.json" "$DATA/datasets/"
  cp -r "$shared/tokenizers/qwen2.5-instruct" "$DATA/tokenizers/"
  exclude=.git/info/exclude
  mkdir -p .git/info
  for path in "$WHEELS" "$DATA"; do  # git-ignored here only (the device call carries them by name)
    case $path in /*) continue;; esac
    grep -qxF "/$path/" "$exclude" 2>/dev/null || echo "/$path/" >>"$exclude"
  done
  du -sh "$WHEELS" "$DATA"
  echo "ready: device call with carry [\"$WHEELS\", \"$DATA\"], command 'bash bench/gpu_suite.sh', timeout_s 600"
}

if [ "${1:-}" = --prepare ]; then prepare; exit $?; fi

if [ -n "${OUT:-}" ] && mkdir -p "$OUT" 2>/dev/null; then  # the whole log comes back even if the call is cut off
  exec > >(tee -a "$OUT/gpu_suite.log") 2>&1
  TEE_PID=$!
fi
finish() {  # exit with $1 once the log is whole
  if [ -n "${TEE_PID:-}" ]; then exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null; fi
  exit "$1"
}

missing() {  # the modules of "$@" that do not import
  python3 - "$@" <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}
REQUIRED="datasets simple_parsing"  # scripts/train.py and scripts/encode.py
CASES="deepspeed trl"  # the zero3 cases, the TRL cases
OPTIONAL="liger_kernel"  # TRL's layer kernels: its absence alone installs nothing
absent=$(missing $REQUIRED $CASES)
if [ -n "$absent" ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS/ into /tmp/site (missing here: $absent)"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      if ! python3 -c "import transformers" 2>/dev/null; then  # e.g. a dependency floor the image's packages miss
        python3 -c "import transformers" 2>&1 | tail -1
        rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info
        echo "warning: the carried transformers does not import here; using the image's own"
      fi
    else
      echo "warning: the wheel install failed (above; they are built for CPython 3.12 on x86-64); going on with what imports"
    fi
  else
    echo "no wheels in $WHEELS/ (missing here: $absent)"
  fi
  still=$(missing $REQUIRED)
  if [ -n "$still" ]; then
    echo "gpu_suite: cannot run, missing: $still. The GPU machine has no network: run 'bash bench/gpu_suite.sh --prepare'"
    echo "on the CPU machine (wheels into $WHEELS/, data into $DATA/) and name both in the device call's carry."
    finish 3
  fi
fi
for module in $(missing $CASES $OPTIONAL); do
  case $module in
    deepspeed) echo "note: deepspeed missing: the zero3 cases will fail (carry deepspeed-0.19.8, hjson, pydantic)";;
    trl) echo "note: trl missing: the TRL cases are skipped and the TRL goal is not evaluated (carry trl-1.16.0)";;
    liger_kernel) echo "note: liger_kernel missing: TRL runs without liger's layer kernels (optional)";;
  esac
done

args=("$@")
case " $* " in
  *" --dry-run "*|*" --cpu-smoke "*|*" --list "*) ;;  # no device check needed
  *) if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
       nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
       # bf16 packed vs alone on gpt-oss-, Gemma-3-, Qwen3-Next- and Qwen3-MoE-shaped models (~1 minute, from the
       # suite's budget): the table goes to $OUT/gpu_families.md.
       timeout 150 python3 bench/gpu_families.py | tee "${OUT:-/tmp}/gpu_families.md"
     else
       echo "no GPU: running the dry run (tiny model, 2 steps, CPU)"; args+=(--dry-run)
     fi;;
esac
python3 bench/gpu_suite.py --started_at "$SUITE_STARTED" "${args[@]}"
finish $?
