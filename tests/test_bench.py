"""Every benchmark under bench/ runs in its smoke mode (tiny sizes, seconds) and prints its table, so a refactor that
breaks one fails here instead of on the next person who wants a number. The GPU suite's dry run is in
test_gpu_suite.py; the helpers that other benchmarks start are run by those benchmarks' smoke modes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_path

BENCH = os.path.join(ROOT, "bench")
# script -> the smoke runs, and a line each must print (a table row or the result line it reports)
SMOKES = {
    "encode.py": [(["--smoke"], "| ours"), (["--smoke", "--process"], "| ours"), (["--smoke", "--memory"], "ours")],
    "train.py": [(["--smoke"], "| scripts/train.py (ours)"), (["--smoke", "--packing"], "| tiny"),
                 (["--smoke", "--families"], "| qwen3_moe")],
    "pack.py": [(["--smoke"], "| Alpaca-style 2k")],
    "lora_memory.py": [(["--smoke"], "baseline")],
    "loss_memory.py": [(["--smoke"], "     256")],
    "packing_check.py": [(["--smoke"], "loss")],
    "gpu_families.py": [(["--smoke"], "gpt_oss")],
    "gpu_check.py": [(["--size", "tiny", "--rows", "8", "--sequence_length", "256", "--out", "{tmp}"], "")],
}
# scripts that are started by others (or are a library), and where their smoke run happens
HELPERS = {
    "memory.py": "encode.py --memory, loss_memory.py, lora_memory.py",
    "roll_style_encode.py": "encode.py --process",
    "trl_style_encode.py": "encode.py --process",
    "trl_case.py": "lora_memory.py (reports n/a when trl is not installed)",
    "gpu_suite.py": "tests/test_gpu_suite.py (--dry-run end to end)",
}


def test_every_bench_script_has_a_smoke_run():
    scripts = {name for name in os.listdir(BENCH) if name.endswith(".py")}
    assert scripts == set(SMOKES) | set(HELPERS), "give the new script a smoke mode and a row in SMOKES"


@pytest.mark.parametrize("script,args,expect", [(script, args, expect) for script, runs in SMOKES.items()
                                                for args, expect in runs],
                         ids=lambda value: value if isinstance(value, str) and value.endswith(".py") else
                         " ".join(value) if isinstance(value, list) else None)
def test_smoke_run_prints_its_table(script, args, expect, tmp_path):
    shared_path("datasets", "alpaca_en_demo.json")
    shared_path("tokenizers", "qwen2.5-instruct")
    args = [arg.replace("{tmp}", str(tmp_path / "out")) for arg in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert expect in result.stdout, result.stdout[-4000:]
    assert "Traceback" not in output, output[-4000:]
