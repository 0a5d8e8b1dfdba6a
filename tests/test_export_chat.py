"""scripts/export.py and scripts/chat.py: merged LoRA exports give the adapter's logits, full checkpoints are
copied, chat answers the same from a checkpoint and from its export, and mistakes end in one `error:` line.

The fixtures build, in-process and offline, a tiny Qwen2 base (configs/demo/model's config and byte tokenizer),
a LoRA adapter on it with random non-zero weights (so merging changes the logits) saved in a checkpoint layout,
and a full-weight checkpoint of the base.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

DEMO_MODEL = os.path.join(ROOT, "configs", "demo", "model")
INPUTS = ["<|im_start|>user\nWrite 12 in words.<|im_end|>\n<|im_start|>assistant\n", "hello world", "x"]
PROMPT = "Write 981 in words."


# ----- shared helpers --------------------------------------------------------------------------------

def load_script(name: str):
    """scripts/<name>.py as a module (its main and options), without running it."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run scripts/<name>.py; stdout and stderr as exact text (no newline translation)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *args], input=stdin.encode(),
                            capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def logits_of(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0] for text in INPUTS]


def write_checkpoint(output_dir: str, step: int, save, template: str = "chatml", complete: bool = True) -> str:
    """A checkpoint layout <output_dir>/sft_train/checkpoint-<step>/sft_train/ filled by save(folder)."""
    from sft.train import checkpoint as ckpt

    checkpoint = ckpt.checkpoint_dir(output_dir, step)
    folder = ckpt.model_dir(checkpoint, "sft_train")
    os.makedirs(folder)
    save(folder)
    ckpt.write_template(folder, template)
    if complete:
        with open(os.path.join(checkpoint, ckpt.COMPLETE), "w") as handle:
            handle.write("ok\n")
    return checkpoint


def run_tool_error(module, options, argv, capsys) -> str:
    """Run a script's main through run_tool; it must exit 1 with one `error:` line and nothing else."""
    from sft.cli import run_tool

    with pytest.raises(SystemExit) as exit_info:
        run_tool(module.main, options, argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    return captured.err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders: base model, LoRA output_dir (checkpoint-7), full output_dir (checkpoint-3); and the adapter's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.data.build import load_tokenizer

    root = tmp_path_factory.mktemp("export_chat")
    tokenizer = load_tokenizer(DEMO_MODEL)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL))
    with torch.no_grad():  # answers in printable ASCII: other bytes get zero (tied) output vectors, never the argmax
        for token in range(256):
            if not tokenizer.decode([token]).isprintable() or not tokenizer.decode([token]).isascii():
                base.model.embed_tokens.weight[token] = 0
    base_dir = str(root / "base")
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_logits = logits_of(base, tokenizer)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero; random values make the adapter change the model
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.eval()
    adapter_logits = logits_of(peft_model, tokenizer)
    lora_out = str(root / "lora_run")

    def save_adapter(folder):
        peft_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_checkpoint(lora_out, 7, save_adapter)
    full_out = str(root / "full_run")
    full_checkpoint = write_checkpoint(full_out, 3, lambda folder: shutil.copytree(base_dir, folder, dirs_exist_ok=True))
    return {"root": root, "base": base_dir, "lora_out": lora_out, "full_checkpoint": full_checkpoint,
            "tokenizer": tokenizer, "base_logits": base_logits, "adapter_logits": adapter_logits}


@pytest.fixture(scope="module")
def merged_export(models):
    """The LoRA run exported with --merge (from its output_dir), and the summary printed."""
    export_script = load_script("export")
    out = str(models["root"] / "merged")
    result = export_script.main(export_script.ExportOptions(checkpoint=models["lora_out"], out=out, merge=True))
    return out, result.summary()


# ----- export ----------------------------------------------------------------------------------------

def test_merged_export_gives_the_adapters_logits(models, merged_export):
    from transformers import AutoModelForCausalLM

    from sft.train.checkpoint import saved_template

    out, summary = merged_export
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32
    for merged, adapter, base in zip(logits_of(model, models["tokenizer"]), models["adapter_logits"], models["base_logits"]):
        assert torch.allclose(merged, adapter, atol=1e-5, rtol=0)
        assert (adapter - base).abs().max() > 0.1  # the merge matters
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "template.json"} <= names
    assert not any(name.startswith("adapter_") for name in names)
    assert saved_template(out) == "chatml"
    with open(os.path.join(DEMO_MODEL, "chat_template.jinja")) as handle:
        assert open(os.path.join(out, "chat_template.jinja")).read() == handle.read()
    parameters = sum(p.numel() for p in model.parameters())
    assert summary.startswith("exported merged LoRA adapter + base from LoRA adapter ")
    assert f"checkpoint-7{os.sep}sft_train on base {models['base']} | {parameters:,} parameters | float32 | " \
           f"template chatml -> {out}" in summary
    assert not [name for name in os.listdir(models["root"]) if name.endswith(".tmp-export")]


def test_full_checkpoint_export_is_a_loadable_copy(models):
    from transformers import AutoModelForCausalLM

    export_script = load_script("export")
    out = str(models["root"] / "full_export")
    result = export_script.main(export_script.ExportOptions(checkpoint=models["full_checkpoint"], out=out, merge=True))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for copied, base in zip(logits_of(model, models["tokenizer"]), models["base_logits"]):
        assert torch.equal(copied, base)
    source = os.path.join(models["full_checkpoint"], "sft_train")
    assert sorted(os.listdir(out)) == sorted(os.listdir(source))
    parameters = sum(p.numel() for p in model.parameters())
    assert result.summary() == (f"exported copied full model from model {source} (--merge: a full-weight checkpoint, "
                                f"nothing to merge) | {parameters:,} parameters | float32 | template chatml -> {out}")


def test_export_moved_base_with_base_flag_and_overwrite(models, merged_export, tmp_path, capsys):
    """A base that moved is an error naming it and --base; --base finds it; a non-empty --out needs --overwrite."""
    from sft.export import export, find_model_folder, model_source

    export_script = load_script("export")
    moved = str(tmp_path / "checkpoint-7")
    shutil.copytree(os.path.join(models["lora_out"], "sft_train", "checkpoint-7"), moved)
    config_file = os.path.join(moved, "sft_train", "adapter_config.json")
    config = json.load(open(config_file))
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    json.dump(config, open(config_file, "w"))
    out = str(tmp_path / "export")
    error = run_tool_error(export_script, export_script.ExportOptions, ["--checkpoint", moved, "--out", out, "--merge"], capsys)
    assert f"base model folder {tmp_path / 'gone'} " in error and "--base DIR" in error

    os.makedirs(out)
    open(os.path.join(out, "old.txt"), "w").write("x")
    argv = ["--checkpoint", moved, "--out", out, "--merge", "--base", models["base"]]
    error = run_tool_error(export_script, export_script.ExportOptions, argv, capsys)
    assert "exists and is not empty" in error and "--overwrite" in error
    source = model_source(find_model_folder(moved), base=models["base"])
    export(source, out, merge=True, overwrite=True)
    assert "old.txt" not in os.listdir(out)
    merged_files = {name: open(os.path.join(merged_export[0], name), "rb").read() for name in os.listdir(merged_export[0])}
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == merged_files


def test_export_errors_are_one_line(models, tmp_path, capsys):
    export_script = load_script("export")
    options = export_script.ExportOptions
    checkpoint = os.path.join(models["lora_out"], "sft_train", "checkpoint-7")
    out = str(tmp_path / "out")

    error = run_tool_error(export_script, options, ["--checkpoint", str(tmp_path / "missing"), "--out", out], capsys)
    assert error == f"error: --checkpoint {tmp_path / 'missing'}: no such folder\n"
    (tmp_path / "empty").mkdir()
    error = run_tool_error(export_script, options, ["--checkpoint", str(tmp_path / "empty"), "--out", out], capsys)
    assert "not a checkpoint, model folder or output_dir" in error
    error = run_tool_error(export_script, options, ["--checkpoint", checkpoint, "--out", out], capsys)
    assert "is a LoRA adapter: pass --merge" in error
    error = run_tool_error(export_script, options, ["--checkpoint", checkpoint, "--out", os.path.join(checkpoint, "x"),
                                                    "--merge"], capsys)
    assert "overlaps" in error
    error = run_tool_error(export_script, options, ["--checkpoint", checkpoint, "--out", out, "--cluster_name", "other"],
                           capsys)
    assert "has no model folder other/" in error and "it has: sft_train" in error
    incomplete = shutil.copytree(checkpoint, str(tmp_path / "checkpoint-9"))
    os.remove(os.path.join(incomplete, "COMPLETE"))
    error = run_tool_error(export_script, options, ["--checkpoint", os.path.join(incomplete, "sft_train"), "--out", out,
                                                    "--merge"], capsys)
    assert "is not complete (no COMPLETE marker" in error
    error = run_tool_error(export_script, options, ["--checkpoint", checkpoint], capsys)
    assert "required: --out" in error
    assert not os.path.exists(out)

    # The real script: one line on stderr, status 1, no traceback (and no torch import before the check).
    result = run_script("export", "--checkpoint", str(tmp_path / "missing"), "--out", out)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"error: --checkpoint {tmp_path / 'missing'}: no such folder\n")


# ----- chat ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_chat(merged_export):
    """generate_answer over the merged export, as chat.py builds it."""
    from sft.export import find_model_folder, load_model, load_tokenizer, model_source
    from sft.generation import generate_answer
    from sft.data.templates import get_template

    source = model_source(find_model_folder(merged_export[0], flag="--model"))
    tokenizer = load_tokenizer(source)
    template = get_template(source.template, tokenizer)
    model = load_model(source)
    return lambda messages: generate_answer(model, tokenizer, template, messages, max_new_tokens=12)


def test_stop_rule_stops_at_eos_and_the_one_token_end_of_turn(models):
    from sft.generation import stop_rule
    from sft.data.templates import get_template

    tokenizer = models["tokenizer"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rule = stop_rule(tokenizer, get_template("chatml", tokenizer))
    assert set(rule.ids) == {tokenizer.eos_token_id, im_end} and rule.marker == "<|im_end|>"
    words = tokenizer.encode("one two", add_special_tokens=False)
    assert rule.answer_text(tokenizer, words + [im_end] + words) == "one two"
    alpaca = stop_rule(tokenizer, get_template("alpaca", tokenizer))  # the marker is eos itself
    assert alpaca.ids == (tokenizer.eos_token_id,)
    assert alpaca.answer_text(tokenizer, words) == "one two"


def test_chat_prompt_answers_the_same_from_the_adapter_and_its_export(models, export_chat):
    from sft.export import load_model, model_source
    from sft.generation import conversation, generate_answer
    from sft.data.templates import get_template

    result = run_script("chat", "--model", os.path.join(models["lora_out"], "sft_train", "checkpoint-7"),
                        "--prompt", PROMPT, "--max_new_tokens", "12")
    assert result.returncode == 0, result.stderr
    expected = export_chat(conversation(PROMPT))
    assert len(expected) > 3 and result.stdout == expected + "\n"
    tokenizer = models["tokenizer"]
    base_answer = generate_answer(load_model(model_source(models["base"])), tokenizer, get_template("chatml", tokenizer),
                                  conversation(PROMPT), max_new_tokens=12)
    assert base_answer != expected  # the adapter was applied
    assert f"loaded LoRA adapter {models['lora_out']}" in result.stderr and "template chatml | cpu | greedy" in result.stderr


def test_chat_interactive_keeps_history_until_exit(merged_export, export_chat):
    chat_session = load_script("chat").chat_session

    lines = ["Hello there", "", "And then?", "/exit", "never read"]
    expected = []
    pending = iter(lines)
    turns = chat_session(lambda: next(pending), expected.append, export_chat)
    assert turns == 2 and len(expected) == 2 and all(len(answer) > 3 for answer in expected)
    result = run_script("chat", "--model", merged_export[0], "--max_new_tokens", "12", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(answer + "\n" for answer in expected)


def test_chat_session_history_reset_and_end_of_input():
    chat_session = load_script("chat").chat_session

    seen, written = [], []

    def respond(messages):
        seen.append(messages)
        return f"answer {len(seen)}"

    lines = iter(["first", "second", "/reset", "/help", "third"])
    assert chat_session(lambda: next(lines, None), written.append, respond, system="Be brief.") == 3
    system = {"role": "system", "content": "Be brief."}
    assert seen[1] == [system, {"role": "user", "content": "first"}, {"role": "assistant", "content": "answer 1"},
                       {"role": "user", "content": "second"}]
    assert seen[2] == [system, {"role": "user", "content": "third"}]
    assert written[:3] == ["answer 1", "answer 2", "(history cleared)"]
    assert written[3].startswith("(unknown command /help") and written[4] == "answer 3"


def test_model_folder_resolution(models, merged_export, tmp_path):
    from sft.export import ExportError, find_model_folder, model_source

    folder = os.path.join(models["lora_out"], "sft_train", "checkpoint-7", "sft_train")
    assert find_model_folder(models["lora_out"]) == folder
    assert find_model_folder(os.path.join(models["lora_out"], "sft_train")) == folder
    assert find_model_folder(os.path.dirname(folder)) == folder
    assert find_model_folder(folder) == folder
    assert find_model_folder(merged_export[0]) == merged_export[0]
    source = model_source(folder)
    assert (source.adapter, source.base, source.template) == (True, models["base"], "chatml")
    assert model_source(models["base"]).template == "native"  # no template.json
    with pytest.raises(ExportError, match="is a whole model, not a LoRA adapter"):
        model_source(merged_export[0], base=models["base"])
    (tmp_path / "sft_train").mkdir()
    with pytest.raises(ExportError, match="no complete checkpoint"):
        find_model_folder(str(tmp_path))


def test_chat_errors_are_one_line(models, tmp_path, capsys):
    from sft.data.build import load_tokenizer
    from sft.export import ExportError, load_template, model_source

    chat_script = load_script("chat")
    options = chat_script.ChatOptions
    error = run_tool_error(chat_script, options, ["--model", str(tmp_path / "missing"), "--prompt", "hi"], capsys)
    assert error == f"error: --model {tmp_path / 'missing'}: no such folder\n"
    error = run_tool_error(chat_script, options, ["--model", models["base"], "--max_new_tokens", "0"], capsys)
    assert "--max_new_tokens: must be at least 1" in error
    error = run_tool_error(chat_script, options, ["--model", models["base"], "--template", "nope"], capsys)
    assert error.startswith("error: --template nope: unknown template 'nope'")
    tokenizer = load_tokenizer(models["base"])
    tokenizer.chat_template = None
    with pytest.raises(ExportError, match="template native is the tokenizer's own chat template, and it has none; "
                                          "choose a template with --template"):
        load_template(model_source(models["base"]), tokenizer)
    assert load_template(model_source(models["base"]), tokenizer, "chatml").name == "chatml"
