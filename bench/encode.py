"""Encoding throughput, side by side in one run: ours (1 and 2 workers) vs a ROLL-style encoder vs the raw limit.

    python bench/encode.py [--rows 50000] [--tokenizer ../shared/data/tokenizers/qwen2.5-instruct]

Data: the shared Alpaca-style files (alpaca_en_demo.json + code_alpaca_2k.json) replicated to --rows
rows. Every encoder runs with the same thread settings: TOKENIZERS_PARALLELISM=false, so each process
tokenizes on one thread. Times cover JSON file -> encoded rows in memory (not the save to disk).

* ours: scripts/encode.py's path (sft.encoding.encode_split) with the named qwen2_5 and the native template;
* ROLL-style: per sample, render the prompt and the prompt+response with apply_chat_template, tokenize
  both one at a time, mask len(prompt_ids) tokens, through datasets.map (one process);
* raw limit: batch-tokenizing the already-rendered full strings, nothing else (and the same split over
  two processes, which bounds what 2 workers can reach on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def make_rows(count: int) -> list[dict]:
    base = []
    for name in ("alpaca_en_demo.json", "code_alpaca_2k.json"):
        with open(os.path.join(SHARED, "datasets", name), encoding="utf-8") as handle:
            base += [row for row in json.load(handle) if row["output"].strip()]
    return [base[i % len(base)] for i in range(count)]


def roll_style(path: str, tokenizer) -> int:
    import datasets

    def encode(example):
        user = example["instruction"] + ("\n" + example["input"] if example["input"] else "")
        prompt = [{"role": "user", "content": user}]
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": example["output"]}], tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        input_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        return {"input_ids": input_ids, "labels": [-100] * len(prompt_ids) + input_ids[len(prompt_ids):]}

    dataset = datasets.load_dataset("json", data_files=path, split="train", keep_in_memory=True)
    encoded = dataset.map(encode, remove_columns=dataset.column_names, keep_in_memory=True,
                          load_from_cache_file=False, desc="ROLL-style")
    return len(encoded)


def raw_limit(texts: list[str], tokenizer) -> int:
    backend = tokenizer.backend_tokenizer
    for start in range(0, len(texts), 512):
        backend.encode_batch(texts[start:start + 512], add_special_tokens=False)
    return len(texts)


_FORKED: dict = {}


def _raw_limit_half(half: int) -> int:
    texts, tokenizer = _FORKED["texts"], _FORKED["tokenizer"]
    middle = len(texts) // 2
    return raw_limit(texts[:middle] if half == 0 else texts[middle:], tokenizer)


def raw_limit_two_processes(texts: list[str], tokenizer) -> int:
    """The raw limit with the texts split over two forked processes (inherited, not pickled): two cores' best."""
    import multiprocessing

    _FORKED.update(texts=texts, tokenizer=tokenizer)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return sum(pool.map(_raw_limit_half, [0, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best of each encoder is reported")
    parser.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "qwen2.5-instruct"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from sft.data import FieldMapping, conversation_from_row
    from sft.encoding import EncodeSettings, encode_split
    from sft.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = make_rows(args.rows)
    workdir = tempfile.mkdtemp(prefix="bench_encode_")
    path = os.path.join(workdir, "rows.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    settings = EncodeSettings(FieldMapping(), sequence_length=4096)
    rendered = [get_template("qwen2_5", tokenizer).render(*conversation_from_row(row, settings.mapping))[0] for row in rows]
    tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(rendered[:5000], add_special_tokens=False))
    tokens_per_row = tokens / min(5000, len(rendered))

    encoders = [
        ("raw limit (batch-tokenize rendered strings)", lambda: raw_limit(rendered, tokenizer)),
        ("raw limit, 2 processes", lambda: raw_limit_two_processes(rendered, tokenizer)),
    ]
    for template in ("qwen2_5", "native"):
        for workers in (1, 2):
            encoders.append((f"ours, template {template}, {workers} worker{'s' if workers > 1 else ''}",
                             lambda template=template, workers=workers: len(encode_split(
                                 [path], get_template(template, tokenizer), tokenizer, settings, workers).dataset)))
    encoders.append(("ROLL-style (2 renders + 2 tokenizations per sample)", lambda: roll_style(path, tokenizer)))

    # Round-robin repeats, best of each: this machine's speed drifts, so side-by-side rounds keep ratios fair.
    best: dict[str, tuple[int, float]] = {}
    for round_index in range(args.repeats):
        for name, run in encoders:
            start = time.perf_counter()
            count = run()
            seconds = time.perf_counter() - start
            if name not in best or count / seconds > best[name][0] / best[name][1]:
                best[name] = (count, seconds)
            print(f"  round {round_index + 1}: {name}: {count / seconds:,.0f} samples/s", file=sys.stderr)
    results = [(name, *best[name]) for name, _ in encoders]

    raw_rate = results[0][1] / results[0][2]
    roll_rate = results[-1][1] / results[-1][2]
    print(f"\n{args.rows:,} Alpaca-style rows, {tokenizer.name_or_path.rstrip('/').split('/')[-1]} tokenizer, "
          f"~{tokens_per_row:.0f} tokens/row, TOKENIZERS_PARALLELISM=false, best of {args.repeats} rounds\n")
    print(f"| {'encoder':<52} | {'samples/s':>9} | {'tokens/s':>10} | {'x ROLL-style':>12} | {'x raw limit':>11} |")
    print(f"|{'-' * 54}|{'-' * 11}:|{'-' * 12}:|{'-' * 14}:|{'-' * 13}:|")
    for name, count, seconds in results:
        rate = count / seconds
        print(f"| {name:<52} | {rate:>9,.0f} | {rate * tokens_per_row:>10,.0f} | {rate / roll_rate:>12.2f} | {rate / raw_rate:>11.2f} |")


if __name__ == "__main__":
    main()
