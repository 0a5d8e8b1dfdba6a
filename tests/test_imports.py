"""scripts/encode.py and scripts/pack.py never import torch: it is a second or more of their start-up and
they do not use it. Checked in a fresh interpreter, since this test process may have torch loaded already."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Imports what the two scripts import at start-up (their modules, run under a name that is not
# "__main__", so main() does not run) and prints the torch modules that got loaded.
IMPORT_SCRIPTS = """
import json, runpy, sys
sys.path.insert(0, {root!r})
import sft.cli, sft.config, sft.data.build, sft.data.packing
for script in ("encode.py", "pack.py"):
    runpy.run_path({root!r} + "/scripts/" + script, run_name="imported_by_test")
print(json.dumps(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))))
"""

# Runs scripts/encode.py as a script, then prints the torch modules loaded by the end of the run.
RUN_ENCODE = """
import json, runpy, sys
sys.argv = ["encode.py", "--config_path", {config!r}, "--out", {out!r}]
try:
    runpy.run_path({root!r} + "/scripts/encode.py", run_name="__main__")
finally:
    print(json.dumps(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))))
"""


def torch_modules_after(code: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_encode_and_pack_scripts_import_no_torch():
    assert torch_modules_after(IMPORT_SCRIPTS.format(root=ROOT)) == []


def test_the_check_sees_torch_when_it_is_imported():
    # The same probe on a module that does import torch must report it, or the test above proves nothing.
    code = IMPORT_SCRIPTS.format(root=ROOT).replace("import sft.cli,", "import sft.data.collate, sft.cli,")
    assert "torch" in torch_modules_after(code)


def test_an_encode_run_loads_no_torch(tmp_path, byte_tokenizer_dir):
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(20)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    config = tmp_path / "run.yaml"
    config.write_text(f"pretrain: {byte_tokenizer_dir}\noutput_dir: {tmp_path / 'out'}\nsequence_length: 64\n"
                      f"sft_train:\n  data_args:\n    file_name: {tmp_path / 'train.json'}\n    template: chatml\n")
    code = RUN_ENCODE.format(root=ROOT, config=str(config), out=str(tmp_path / "encoded"))
    assert torch_modules_after(code) == []
