"""An independent check of labels: expected text from HF's own chat-template rendering (or a plain formula),
expected targets from each template family's rule, compared token by token after decoding."""

import json

from sft.data import FieldMapping, conversation_from_row, read_rows

IGNORE_INDEX = -100


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def supervised_runs(labels):
    """Contiguous runs of target positions."""
    runs, current = [], []
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(position)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def expected_render(name, tokenizer, messages):
    """The full text the template should produce, from HF's apply_chat_template where the family has one."""
    if name in ("native", "qwen2_5", "qwen3"):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if name == "llama3":
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return text.removesuffix("<|start_header_id|>assistant<|end_header_id|>\n\n")  # the old template's stray header
    if name == "chatml":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    bos = tokenizer.bos_token or ""
    if name in ("base", "empty"):
        return bos + "".join(m["content"] + (tokenizer.eos_token if m["role"] == "assistant" else "") for m in messages)
    if name == "alpaca":
        system = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        parts = [bos + system + "\n\n"]
        for m in messages:
            if m["role"] == "assistant":
                parts.append("### Response:\n" + m["content"] + tokenizer.eos_token + "\n\n")
            else:
                parts.append("### Instruction:\n" + m["content"] + "\n\n")
        return "".join(parts)
    raise AssertionError(name)


def expected_targets(name, tokenizer, messages, trained, full_text):
    """What each trained turn's labels must decode to."""
    targets = []
    for index, message in enumerate(messages):
        if not trained[index]:
            continue
        content = message["content"]
        if name in ("chatml", "qwen2_5") or (name == "native" and "qwen2.5" in tokenizer.name_or_path):
            targets.append(content + "<|im_end|>")
        elif name == "llama3" or (name == "native" and "llama3" in tokenizer.name_or_path):
            targets.append(content.strip() + "<|eot_id|>")
        elif name in ("base", "empty"):
            # No markup between turns: trained turns with only empty text between them form one run.
            previous = max((j for j in range(index) if trained[j]), default=None)
            if previous is not None and all(messages[j]["content"] == "" for j in range(previous + 1, index)):
                targets[-1] += content + tokenizer.eos_token
            else:
                targets.append(content + tokenizer.eos_token)
        elif name == "alpaca":
            targets.append(content + tokenizer.eos_token)
        else:
            # Qwen3 rewrites turns (a <think> block on the last one): the target is what HF renders after the
            # generation prompt, through <|im_end|>.
            prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            assert full_text.startswith(prompt)
            end = full_text.index("<|im_end|>", len(prompt)) + len("<|im_end|>")
            target = full_text[len(prompt):end]
            assert target.endswith(content.split("</think>")[-1].strip() + "<|im_end|>") or content.strip() in target
            targets.append(target)
    return targets


def check_encoded(dataset, files, mapping: FieldMapping, name, tokenizer, loss_on_turns="all"):
    """Check every kept row of an encoded dataset against its source row. Returns rows checked."""
    raw = {}
    for path in files:
        rows, _ = read_rows(path)
        for row in rows:
            raw[f"{path}:{row.row}"] = row.text
    checked = 0
    for example in dataset:
        messages, trained = conversation_from_row(json.loads(raw[example["source"]]), mapping, loss_on_turns)
        text = expected_render(name, tokenizer, messages)
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels)
        assert decode(tokenizer, ids) == text, example["source"]
        for label, token in zip(labels, ids):
            assert label == IGNORE_INDEX or label == token
        runs = [decode(tokenizer, [ids[p] for p in run]) for run in supervised_runs(labels)]
        assert runs == expected_targets(name, tokenizer, messages, trained, text), example["source"]
        checked += 1
    return checked
