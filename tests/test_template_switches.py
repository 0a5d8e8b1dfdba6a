"""Template switches (chat_template_kwargs) and Jinja-file templates: every label checked against the tokenizer's
own apply_chat_template with the same switches (tests/labelcheck.py); the switches reach the cache key, the
checkpoint's template record and the chat script's template."""

import json

import pytest

from sft.config import load_config
from sft.data.conversation import FieldMapping
from sft.data.encoding import EncodeSettings
from sft.data.pipeline import encode_split
from sft.data.templates import TemplateError, get_template
from sft.errors import ConfigError
from tests.conftest import real_tokenizer, shared_path
from tests.labelcheck import check_encoded

NO_THINKING = {"enable_thinking": False}


def encode(tokenizer, template, path, key, switches=None):
    settings = EncodeSettings(FieldMapping(messages_key=key), sequence_length=10**7, on_bad_sample="skip")
    return encode_split([path], get_template(template, tokenizer, switches), tokenizer, settings)


def test_qwen3_without_thinking_labels_match_its_own_template_with_the_switch():
    tokenizer = real_tokenizer("qwen3")
    path, key = shared_path("datasets", "glaive_toolcall_en_demo.json"), "conversations"
    result = encode(tokenizer, "native", path, key, NO_THINKING)
    assert result.report["kept"] > 0
    checked = check_encoded(result.dataset, [path], FieldMapping(messages_key=key), "native", tokenizer,
                            switches=NO_THINKING)
    assert checked.rows == result.report["kept"]
    # The generation prompt writes the empty think block, so it is context: no target starts with it, as with
    # thinking on, where the model itself writes it.
    default = encode(tokenizer, "native", path, key)
    first_targets = {
        "off": [tokenizer.decode([i for i, label in zip(ids, labels) if label != -100][:4])
                for ids, labels in zip(result.dataset["input_ids"], result.dataset["labels"])],
        "on": [tokenizer.decode([i for i, label in zip(ids, labels) if label != -100][:4])
               for ids, labels in zip(default.dataset["input_ids"], default.dataset["labels"])]}
    assert not any(text.startswith("<think>") for text in first_targets["off"])
    assert any(text.startswith("<think>") for text in first_targets["on"])


def test_reasoning_rows_are_refused_by_name_when_the_switch_closes_the_think_block():
    tokenizer = real_tokenizer("qwen3")
    path = shared_path("datasets", "reason_tool_use_demo_50.jsonl")
    result = encode(tokenizer, "native", path, "messages", NO_THINKING)
    assert result.report["kept"] == 0 and result.report["rows_read"] == 50
    assert all("writes the think block into the prompt" in reason or "reasoning twice" in reason
               for reason in result.report["rejected"]), result.report["rejected"]


def test_a_jinja_file_template_renders_like_native(tmp_path):
    tokenizer = real_tokenizer("qwen2.5-instruct")
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(tokenizer.chat_template)
    path = shared_path("datasets", "glaive_toolcall_en_demo.json")
    from_file = encode(tokenizer, str(jinja), path, "conversations")
    native = encode(tokenizer, "native", path, "conversations")
    assert from_file.report == native.report
    assert from_file.dataset["input_ids"] == native.dataset["input_ids"]
    assert from_file.dataset["labels"] == native.dataset["labels"]
    check_encoded(from_file.dataset, [path], FieldMapping(messages_key="conversations"), str(jinja), tokenizer)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(TemplateError, match=r"broken\.jinja: not a valid Jinja chat template"):
        get_template(str(broken), tokenizer)


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_switches_are_checked_and_change_the_cache_key(tmp_path):
    from sft.data.build import cache_key

    tokenizer = real_tokenizer("qwen3")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    base = f"pretrain: {shared_path('tokenizers', 'qwen3')}\nsft_train: {{data_args: {{file_name: {data}}}}}\n"
    plain = load_config(write(tmp_path, base), [])
    switched = load_config(write(tmp_path, base), ["--sft_train.data_args.chat_template_kwargs",
                                                   "{enable_thinking: false}"])
    assert switched.sft_train.data_args.chat_template_kwargs == NO_THINKING
    assert cache_key(plain, tokenizer)[0] != cache_key(switched, tokenizer)[0]
    with pytest.raises(ConfigError, match=r"chat_template_kwargs: template chatml is written in Python"):
        load_config(write(tmp_path, base), ["--sft_train.data_args.template", "chatml",
                                            "--sft_train.data_args.chat_template_kwargs", "{enable_thinking: false}"])
    with pytest.raises(ConfigError, match=r"template: Jinja file not found: .*nope\.jinja"):
        load_config(write(tmp_path, base), ["--sft_train.data_args.template", str(tmp_path / "nope.jinja")]).check_paths()
    with pytest.raises(ConfigError, match=r"template: 'vicuna' is not one of .*a Jinja file"):
        load_config(write(tmp_path, base), ["--sft_train.data_args.template", "vicuna"])


def test_the_checkpoint_records_the_switches_and_the_chat_script_uses_them(tmp_path):
    from sft.export import load_template, model_source
    from sft.train import checkpoint as ckpt

    tokenizer = real_tokenizer("qwen3")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    ckpt.write_template(str(folder), "native", NO_THINKING)
    template = load_template(model_source(str(folder)), tokenizer)
    prompt = template.render_text([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # A Jinja-file template travels as its text: the file may be gone where the model is used.
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(real_tokenizer("qwen2.5-instruct").chat_template)
    ckpt.write_template(str(folder), str(jinja), None, jinja.read_text())
    jinja.unlink()
    assert load_template(model_source(str(folder)), tokenizer).name == str(jinja)
