"""Encoding speed and memory: ours vs ROLL-style and TRL-style encoders. Three tables, one per mode:

    python bench/encode.py [--rows 50000]             # in-process throughput (below)
    python bench/encode.py --process [--rows 50000]   # whole processes, start-up included: the tracked goal
    python bench/encode.py --memory --rows 200000 1000000 [--timeout 900]   # whole processes, peak memory
    python bench/encode.py --smoke [--process | --memory]                  # a few hundred rows: seconds

Data: the shared Alpaca-style files (alpaca_en_demo.json + code_alpaca_2k.json) replicated to --rows
rows. Every encoder runs with the same thread settings: TOKENIZERS_PARALLELISM=false, so each process
tokenizes on one thread.

In-process (the default): times cover JSON file -> encoded rows in memory (not the save to disk).

* ours: scripts/encode.py's path (sft.data.pipeline.encode_split) with the named qwen2_5 and the native template;
* ROLL-style: per sample, render the prompt and the prompt+response with apply_chat_template, tokenize
  both one at a time, mask len(prompt_ids) tokens, through datasets.map (one process);
* raw limit: batch-tokenizing the already-rendered full strings, nothing else (and the same split over
  two processes, which bounds what 2 workers can reach on a 2-core machine).

--process: each encoder is a whole `python` process, from start to the dataset saved on disk, so the
interpreter start, imports and tokenizer load count: `python scripts/encode.py --config_path CFG --out DIR`
(templates native and qwen2_5, 1 worker, sequence_length 4096) against `python bench/roll_style_encode.py`
(the ROLL-style encoder above as its own script). Every run gets a fresh output folder and a fresh
datasets cache (HF_DATASETS_CACHE), so nothing is reused between runs. Rounds go round-robin; best of each.

--memory: JSONL files of each --rows count; ours (`scripts/encode.py`, template qwen2_5, 2 workers)
against `python bench/trl_style_encode.py` (load_dataset + map passes with num_proc=2, as TRL's
SFTTrainer prepares a dataset). Reported: wall time, and the peak of the summed PSS of the whole process
tree (the process and all its workers), sampled from outside every 0.2 s (bench/memory.py). A run past
--timeout seconds is stopped and reported as not finished. Temporary files are removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def base_rows() -> list[dict]:
    """The shared Alpaca-style rows with a non-empty output, in file order."""
    base = []
    for name in ("alpaca_en_demo.json", "code_alpaca_2k.json"):
        with open(os.path.join(SHARED, "datasets", name), encoding="utf-8") as handle:
            base += [row for row in json.load(handle) if row["output"].strip()]
    return base


def make_rows(count: int) -> list[dict]:
    base = base_rows()
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


def in_process_table(args) -> None:
    """The default table: encoders called in this process, on rows already in a JSON file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    args.rows, args.repeats = args.rows[0], args.repeats or 2
    rows = make_rows(args.rows)
    workdir = tempfile.mkdtemp(prefix="bench_encode_")
    path = os.path.join(workdir, "rows.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    try:
        _time_in_process(args, tokenizer, rows, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _time_in_process(args, tokenizer, rows: list[dict], path: str) -> None:
    from sft.data.conversation import FieldMapping, conversation_from_row
    from sft.data.encoding import EncodeSettings
    from sft.data.pipeline import encode_split
    from sft.data.templates import get_template

    settings = EncodeSettings(FieldMapping(), sequence_length=4096)
    rendered = [get_template("qwen2_5", tokenizer).render(conversation_from_row(row, settings.mapping))[0].text for row in rows]
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


# --- Whole processes: --process (speed, start-up included) and --memory (peak PSS of the process tree) ---


def write_rows(path: str, count: int) -> None:
    """`count` shared rows, repeated, as a JSON array (path ending .json) or JSONL; written row by row, so
    a million rows never sit in this process's memory."""
    lines = [json.dumps(row, ensure_ascii=False) for row in base_rows()]
    as_array = path.endswith(".json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[\n" if as_array else "")
        for index in range(count):
            handle.write(lines[index % len(lines)])
            handle.write(",\n" if as_array and index < count - 1 else "\n")
        handle.write("]\n" if as_array else "")


def write_config(workdir: str, data: str, tokenizer: str, template: str, workers: int) -> str:
    """A scripts/encode.py config for `data`; the output folder is given per run with --out."""
    path = os.path.join(workdir, f"encode-{template}-{workers}.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"pretrain: {tokenizer}\noutput_dir: {os.path.join(workdir, 'output')}\nsequence_length: 4096\n"
                     f"sft_train:\n  data_args:\n    file_name: {data}\n    template: {template}\n"
                     f"    preprocessing_num_workers: {workers}\n    on_bad_sample: skip\n")
    return path


def ours_command(config: str):
    return lambda out: [sys.executable, os.path.join(ROOT, "scripts", "encode.py"), "--config_path", config, "--out", out]


def other_command(script: str, tokenizer: str, data: str, *extra: str):
    return lambda out: [sys.executable, os.path.join(ROOT, "bench", script), "--tokenizer", tokenizer, "--data", data,
                        "--out", out, *extra]


def saved_rows(out: str) -> int:
    """Rows in what a run saved: DIR/train for ours (read with load_encoded), DIR itself for the ROLL- and
    TRL-style scripts (save_to_disk folders, which load_encoded reads with load_from_disk)."""
    from sft.data.pipeline import load_encoded

    split = os.path.join(out, "train")
    return len(load_encoded(split if os.path.isdir(split) else out))


def run_encoder(command, workdir: str, timeout=None, sample_memory: bool = False):
    """One run in a fresh folder (output and datasets cache), removed afterwards: (Measured, rows saved)."""
    from memory import run_measured

    run_dir = tempfile.mkdtemp(prefix="run_", dir=workdir)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=os.path.join(run_dir, "hf_cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        measured = run_measured(command(os.path.join(run_dir, "out")), env=env, timeout=timeout, sample_memory=sample_memory)
        rows = saved_rows(os.path.join(run_dir, "out")) if measured.returncode == 0 else 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return measured, rows


def failure(name: str, measured) -> str:
    tail = "\n".join(measured.output.strip().splitlines()[-15:])
    return f"{name}: exit status {measured.returncode} after {measured.seconds:.1f} s; last lines:\n{tail}"


def process_table(args, workdir: str) -> None:
    """Whole processes at args.rows rows, 1 worker, start-up included: seconds, best of args.repeats rounds."""
    rows = args.rows[0]
    data = os.path.join(workdir, "rows.json")
    write_rows(data, rows)
    encoders = [(f"ours: scripts/encode.py, template {template}, 1 worker",
                 ours_command(write_config(workdir, data, args.tokenizer, template, 1))) for template in ("native", "qwen2_5")]
    encoders.append(("ROLL-style: bench/roll_style_encode.py", other_command("roll_style_encode.py", args.tokenizer, data)))
    repeats = args.repeats or 3
    best: dict[str, float] = {}
    for round_index in range(repeats):
        for name, command in encoders:
            measured, saved = run_encoder(command, workdir)
            if measured.returncode != 0:
                raise SystemExit(failure(name, measured))
            if saved != rows:
                raise SystemExit(f"{name} saved {saved:,} rows of {rows:,}")
            best[name] = min(best.get(name, measured.seconds), measured.seconds)
            print(f"  round {round_index + 1}: {name}: {measured.seconds:.2f} s", file=sys.stderr)
    roll_seconds = best[encoders[-1][0]]
    print(f"\n{rows:,} Alpaca-style rows (JSON) -> dataset on disk, whole process from start to exit, "
          f"{os.path.basename(args.tokenizer.rstrip('/'))} tokenizer, sequence_length 4096, TOKENIZERS_PARALLELISM=false, "
          f"best of {repeats} rounds\n")
    print(f"| {'encoder':<52} | {'seconds':>7} | {'rows/s':>7} | {'x ROLL-style':>12} |")
    print(f"|{'-' * 54}|{'-' * 8}:|{'-' * 8}:|{'-' * 13}:|")
    for name, _ in encoders:
        seconds = best[name]
        print(f"| {name:<52} | {seconds:>7.2f} | {rows / seconds:>7,.0f} | {roll_seconds / seconds:>12.2f} |")


def memory_table(args, workdir: str) -> None:
    """Whole processes on JSONL files of each args.rows count: wall time and peak PSS of the process tree."""
    results = []
    for rows in args.rows:
        data = os.path.join(workdir, f"rows-{rows}.jsonl")
        write_rows(data, rows)
        size = os.path.getsize(data)
        encoders = [("ours: scripts/encode.py, qwen2_5, 2 workers",
                     ours_command(write_config(workdir, data, args.tokenizer, "qwen2_5", 2))),
                    ("TRL-style: bench/trl_style_encode.py, num_proc 2",
                     other_command("trl_style_encode.py", args.tokenizer, data, "--num_proc", "2"))]
        for name, command in encoders:
            print(f"  {rows:,} rows: {name} ...", file=sys.stderr)
            measured, saved = run_encoder(command, workdir, timeout=args.timeout, sample_memory=True)
            if measured.returncode is None:
                outcome = f"did not finish in {args.timeout:.0f} s"
            elif measured.returncode != 0:
                outcome = f"failed, exit status {measured.returncode}"
                print(failure(name, measured), file=sys.stderr)
            else:
                outcome = "ok" if saved == rows else f"saved {saved:,} rows"
            print(f"  {rows:,} rows: {name}: {measured.seconds:.1f} s, peak PSS {measured.peak_pss_bytes / 2**30:.2f} GiB, "
                  f"{outcome}", file=sys.stderr)
            results.append((name, rows, size, measured, outcome))
        os.remove(data)
    print(f"\nAlpaca-style rows (JSONL) -> dataset on disk, whole process tree, "
          f"{os.path.basename(args.tokenizer.rstrip('/'))} tokenizer, TOKENIZERS_PARALLELISM=false; "
          f"peak = largest sum of PSS over the process and its workers, sampled every 0.2 s\n")
    print(f"| {'encoder':<48} | {'rows':>9} | {'input MB':>8} | {'seconds':>7} | {'rows/s':>7} | {'peak PSS GiB':>12} | outcome |")
    print(f"|{'-' * 50}|{'-' * 10}:|{'-' * 9}:|{'-' * 8}:|{'-' * 8}:|{'-' * 13}:|---------|")
    for name, rows, size, measured, outcome in results:
        rate = f"{rows / measured.seconds:>7,.0f}" if outcome == "ok" else f"{'-':>7}"
        print(f"| {name:<48} | {rows:>9,} | {size / 1e6:>8,.0f} | {measured.seconds:>7.1f} | {rate} | "
              f"{measured.peak_pss_bytes / 2**30:>12.2f} | {outcome} |")
    if len(args.rows) > 1:
        print(f"\nPeak PSS at {args.rows[-1]:,} rows / at {args.rows[0]:,} rows "
              f"({args.rows[-1] / args.rows[0]:.0f}x the rows):\n")
        for name in dict.fromkeys(name for name, *_ in results):
            peaks = {rows: measured.peak_pss_bytes for n, rows, _, measured, outcome in results if n == name and outcome == "ok"}
            ratio = f"{peaks[args.rows[-1]] / peaks[args.rows[0]]:.2f}x" if len(peaks) == len(args.rows) else "n/a (a run did not finish)"
            print(f"* {name}: {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--process", action="store_true", help="whole-process speed table, start-up included")
    mode.add_argument("--memory", action="store_true", help="whole-process wall time and peak PSS table")
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="rows (several with --memory); default 50000, or 200000 1000000 with --memory")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds, best of each reported; default 2 in-process, 3 with --process (--memory runs once)")
    parser.add_argument("--timeout", type=float, default=900, help="--memory: stop a run after this many seconds")
    parser.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "qwen2.5-instruct"))
    parser.add_argument("--smoke", action="store_true", help="a few hundred rows, one round: seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args.rows = args.rows or ([300, 600] if args.memory else [300])
        args.repeats, args.timeout = 1, min(args.timeout, 120)
    args.rows = args.rows or ([200_000, 1_000_000] if args.memory else [50_000])
    args.tokenizer = os.path.abspath(args.tokenizer)

    if not (args.process or args.memory):
        in_process_table(args)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/memory.py
    workdir = tempfile.mkdtemp(prefix="bench_encode_")
    try:
        (process_table if args.process else memory_table)(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
