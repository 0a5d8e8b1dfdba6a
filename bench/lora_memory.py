"""Peak memory vs tokens per step: full training and LoRA with scripts/train.py, and TRL's SFTTrainer + PEFT.

    python bench/lora_memory.py                           # 1024 and 4096 tokens per step: ~15 min on 2 cores
    python bench/lora_memory.py --tokens 1024 4096 8192   # other sizes (multiples of --sample_length): +~25 min
    python bench/lora_memory.py --smoke                   # smoke test: 1024 tokens per step, a 2-layer model

Every case is its own process, 2 optimizer steps, measured from outside (bench/memory.py): the peak of the
summed PSS of the process tree, sampled every 0.1 s, and its wall time (start-up, data, model load and, for
scripts/train.py, its final checkpoint included: it always saves at the last step).

    1. ours, full training, defaults (no gradient checkpointing, loss_chunk_size as the config defaults it: 1024)
    2. ours, LoRA r=16 alpha 32 on all linear layers, no checkpointing, loss_chunk_size 0 (all target logits at once)
    3. ours, LoRA + gradient checkpointing, loss_chunk_size 0
    4. ours, LoRA + gradient checkpointing + loss_chunk_size --chunk (256)
    5. TRL SFTTrainer + PEFT LoraConfig(r=16, alpha 32, all-linear) + gradient checkpointing (bench/trl_case.py)

Model: Qwen2-shaped, built from a config and saved once with its weights (LoRA loads them): vocabulary 151,936
(the Qwen2.5 tokenizer from ../shared/data, used by both trainers), hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, tied embeddings: 100M parameters, 78M of them the embedding / output layer; fp32, sdpa.
Data: synthetic single-turn rows, a short instruction and an answer of single-token words, every sample exactly
--sample_length tokens (~92% of them supervised) so no batch has padding; a step is tokens / sample_length
samples. Ours reads {"instruction", "input": "", "output"} with template qwen2_5; TRL reads the same texts as
prompt/completion messages through the tokenizer's chat template (completion-only loss). The tokens and
supervised tokens of each step are printed for both, from their own logs.

The baseline row is a process that imports torch and transformers and loads the model: subtract it to see what
training adds. Goals, per tokens/step: (a) case 4 <= 40% of case 1; (b) case 4 <= case 5. A case whose step has
no more targets than its loss_chunk_size runs the unchunked loss; the output says where that happened.

Sizes: with a 151,936-token output layer a step costs ~15-20 s per 1,024 tokens on 2 shared cores, so the default
stops at 4,096 tokens per step (~15 min in all). 8,192 adds ~25 min, and its loss_chunk_size 0 cases would need
~18 GB (4.6 GB per copy of the target logits; measured at 4,096: 9.4 GiB with 2.3 GB per copy).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
QWEN_TOKENIZER = os.path.join(SHARED, "tokenizers", "qwen2.5-instruct")

from memory import run_measured  # bench/memory.py: the script's folder is on sys.path

GIB = 1024 ** 3
STEPS = 2
LORA_RANK = 16
SHAPE = dict(vocab_size=151936, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2)
QUICK_SHAPE = dict(SHAPE, num_hidden_layers=2)
INSTRUCTION = "Write a long story made of simple words."
BASELINE_CODE = """import sys, time
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(sum(float(p.sum()) for p in model.parameters()))  # reads every weight, so all are resident
time.sleep(1.0)
"""


@dataclass
class Case:
    name: str
    overrides: list[str] = field(default_factory=list)
    """scripts/train.py dotted overrides; TRL's case has none (see bench/trl_case.py)."""
    trl: bool = False
    loss_chunk_size: int = 0
    """Ours: the loss_chunk_size the run uses (0: all target logits at once)."""


def cases(chunk: int) -> list[Case]:
    from sft.config import ModelArgs

    lora = ["--sft_train.model_args.lora_rank", str(LORA_RANK), "--sft_train.model_args.lora_alpha", str(2 * LORA_RANK)]
    model = "--sft_train.model_args."
    checkpointing = [model + "gradient_checkpointing", "true"]
    return [
        Case("1 ours full, defaults", [model + "lora_rank", "0"], loss_chunk_size=ModelArgs().loss_chunk_size),
        Case("2 ours LoRA, chunk 0", lora + [model + "loss_chunk_size", "0"]),
        Case("3 ours LoRA+ckpt, chunk 0", lora + checkpointing + [model + "loss_chunk_size", "0"]),
        Case(f"4 ours LoRA+ckpt, chunk {chunk}", lora + checkpointing + [model + "loss_chunk_size", str(chunk)],
             loss_chunk_size=chunk),
        Case("5 TRL LoRA+ckpt", trl=True),
    ]


# ----- setup: model, data, encoded data --------------------------------------------------------------
def save_model(folder: str, shape: dict) -> int:
    """A Qwen2-shaped model with random weights, saved with the Qwen2.5 tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(tie_word_embeddings=True, use_cache=False, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def single_token_words(tokenizer) -> list[str]:
    """Lower-case words that are one token after a space, so an answer of N of them is N tokens."""
    words = sorted(token[1:] for token in tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,8}", token))
    return [word for word in words[:20000] if len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1]


def write_rows(folder: str, count: int, sample_length: int) -> tuple[str, str]:
    """`count` rows of exactly `sample_length` tokens under the Qwen2.5 chat template, as Alpaca rows (ours) and
    as prompt/completion messages (TRL); returns the two JSONL paths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    words = single_token_words(tokenizer)

    def render_length(answer: str) -> int:
        messages = [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": answer}]
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    # "Story:" then single-token words: every answer of the same word count has the same token count.
    overhead = render_length("Story:")
    answer_words = sample_length - overhead
    generator = random.Random(0)
    answers = ["Story:" + "".join(" " + generator.choice(words) for _ in range(answer_words)) for _ in range(count)]
    lengths = {render_length(answer) for answer in answers[:4]}
    if lengths != {sample_length}:
        raise SystemExit(f"synthetic rows are {sorted(lengths)} tokens, not {sample_length}")
    ours, trl = os.path.join(folder, "rows_alpaca.jsonl"), os.path.join(folder, "rows_prompt_completion.jsonl")
    with open(ours, "w", encoding="utf-8") as alpaca, open(trl, "w", encoding="utf-8") as conversational:
        for answer in answers:
            alpaca.write(json.dumps({"instruction": INSTRUCTION, "input": "", "output": answer}) + "\n")
            conversational.write(json.dumps({"prompt": [{"role": "user", "content": INSTRUCTION}],
                                             "completion": [{"role": "assistant", "content": answer}]}) + "\n")
    return ours, trl


def write_config(work: str, model: str, rows: str, sample_length: int, encoded: str | None = None) -> str:
    path = os.path.join(work, "run.yaml")
    encoded_line = f", encoded_path: {encoded}" if encoded else ""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"""seed: 0
output_dir: {work}/encode
save_steps: 100000
logging_steps: 1
eval_steps: 100000
sequence_length: {sample_length}
pretrain: {model}
track_with: none
sft_train:
  model_args: {{dtype: fp32, from_scratch: false, attn_implementation: sdpa}}
  training_args: {{max_steps: {STEPS}, learning_rate: 1.0e-4, per_device_train_batch_size: 1}}
  data_args: {{file_name: {rows}, template: qwen2_5{encoded_line}}}
""")
    return path


def encode(work: str, model: str, rows: str, sample_length: int) -> str:
    """Encode the rows once with scripts/encode.py, so the measured runs only train; returns the run config."""
    import subprocess

    folder = os.path.join(work, "encoded")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "encode.py"), "--config_path",
                    write_config(work, model, rows, sample_length), "--out", folder],
                   check=True, capture_output=True, cwd=ROOT)
    return write_config(work, model, rows, sample_length, encoded=folder)


# ----- one measured case -----------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    tokens_per_step: int
    peak_gib: float
    seconds: float
    ok: bool
    steps: list[dict]
    """Per optimizer step: tokens and supervised tokens, from the trainer's own log."""
    loss_chunk_size: int = 0

    def unchunked(self) -> bool:
        """A chunked case whose steps had no more targets than a chunk: it ran the unchunked loss."""
        most = max((step["targets"] for step in self.steps), default=None)
        return self.loss_chunk_size > 0 and most is not None and most <= self.loss_chunk_size


def ours_steps(output_dir: str) -> list[dict]:
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "logs", "metrics.jsonl"), encoding="utf-8")]
    rows = [row for row in rows if "train/tokens_seen" in row]
    steps, seen = [], 0
    for row in rows:
        tokens = int(row["train/tokens_seen"]) - seen
        seen = int(row["train/tokens_seen"])
        steps.append({"tokens": tokens, "targets": round(row["perf/supervised_fraction"] * tokens)})
    return steps


def run_case(case: Case, work: str, config: str, model: str, trl_rows: str, batch: int, sample_length: int,
             timeout: float) -> Result:
    output_dir = os.path.join(work, "run")
    shutil.rmtree(output_dir, ignore_errors=True)
    if case.trl:
        command = [sys.executable, os.path.join(ROOT, "bench", "trl_case.py"), "--model", model, "--data", trl_rows,
                   "--batch", str(batch), "--steps", str(STEPS), "--max_length", str(sample_length + 16),
                   "--rank", str(LORA_RANK), "--out", output_dir]
    else:
        command = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config_path", config,
                   "--output_dir", output_dir, "--sft_train.training_args.per_device_train_batch_size", str(batch),
                   *case.overrides]
    measured = run_measured(command, env=dict(os.environ), timeout=timeout, interval=0.1)
    ok = measured.returncode == 0
    steps: list[dict] = []
    if ok:
        if case.trl:
            line = [text for text in measured.output.splitlines() if text.startswith("TRL_TOKENS ")][-1]
            steps = json.loads(line[len("TRL_TOKENS "):])
        else:
            steps = ours_steps(output_dir)
    else:
        status = "timed out" if measured.returncode is None else f"exit {measured.returncode}"
        print(f"  {case.name} at {batch * sample_length} tokens/step failed ({status}):\n"
              + "\n".join(measured.output.splitlines()[-15:]), file=sys.stderr)
    shutil.rmtree(output_dir, ignore_errors=True)
    result = Result(case.name, batch * sample_length, measured.peak_pss_bytes / GIB, measured.seconds, ok, steps,
                    case.loss_chunk_size)
    print(f"  {result.case:<32} {result.tokens_per_step:>6} tokens/step  peak {result.peak_gib:6.2f} GiB  "
          f"{result.seconds:6.1f} s  steps {[(s['tokens'], s['targets']) for s in steps]}", flush=True)
    return result


def baseline(model: str) -> tuple[float, float]:
    measured = run_measured([sys.executable, "-c", BASELINE_CODE, model], env=dict(os.environ), interval=0.1)
    return measured.peak_pss_bytes / GIB, measured.seconds


# ----- report ----------------------------------------------------------------------------------------
def find(results: list[Result], size: int, number: str) -> Result | None:
    """The finished result of case `number` ("1".."5") at `size` tokens per step."""
    return next((r for r in results if r.tokens_per_step == size and r.case.startswith(number + " ") and r.ok), None)


def print_report(results: list[Result], base: tuple[float, float], sizes: list[int]) -> None:
    print(f"\n| {'case':<35} | {'tokens/step':>11} | {'peak PSS GiB':>12} | {'vs ours-full':>12} | {'seconds':>7} |")
    print(f"|{'-' * 37}|{'-' * 12}:|{'-' * 13}:|{'-' * 13}:|{'-' * 8}:|")
    print(f"| {'baseline (torch+transformers+model)':<35} | {'-':>11} | {base[0]:>12.2f} | {'':12} | {base[1]:>7.1f} |")
    for size in sizes:
        full = find(results, size, "1")
        for result in (r for r in results if r.tokens_per_step == size):
            peak = f"{result.peak_gib:.2f}" + ("" if result.ok else " (failed)")
            ratio = f"{result.peak_gib / full.peak_gib:.2f}x" if full and result.ok else "-"
            print(f"| {result.case:<35} | {size:>11,} | {peak:>12} | {ratio:>12} | {result.seconds:>7.1f} |")
    print()
    for size in sizes:
        full, chunked, trl = (find(results, size, number) for number in ("1", "4", "5"))
        if not (full and chunked and trl):
            print(f"tokens/step {size:,}: goals not evaluated (a case failed)")
            continue
        limit = 0.40 * full.peak_gib
        print(f"tokens/step {size:,}: (a) case 4 {chunked.peak_gib:.2f} GiB <= 40% of case 1 {full.peak_gib:.2f} GiB "
              f"({limit:.2f}): {'PASS' if chunked.peak_gib <= limit else 'FAIL'} "
              f"({chunked.peak_gib / full.peak_gib:.0%}); (b) case 4 {chunked.peak_gib:.2f} GiB <= TRL "
              f"{trl.peak_gib:.2f} GiB: {'PASS' if chunked.peak_gib <= trl.peak_gib else 'FAIL'} "
              f"({chunked.peak_gib / trl.peak_gib:.2f}x)")
    print("\ntokens and supervised tokens per step (from each trainer's own log):")
    for result in results:
        steps = [(step["tokens"], step["targets"]) for step in result.steps]
        print(f"  {result.tokens_per_step:>6} | {result.case:<32} | {steps}")
    for result in (r for r in results if r.unchunked()):
        print(f"note: {result.case} at {result.tokens_per_step:,} tokens/step: {result.steps[0]['targets']:,} "
              f"targets per step <= loss_chunk_size {result.loss_chunk_size:,}, so it ran the unchunked loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="tokens per step")
    parser.add_argument("--sample_length", type=int, default=512, help="tokens per sample")
    parser.add_argument("--chunk", type=int, default=256, help="loss_chunk_size of case 4")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a case is stopped")
    parser.add_argument("--smoke", "--quick", action="store_true", dest="smoke",
                        help="1024 tokens/step, a 2-layer model, cases 4 and 5 (the tests run it)")
    args = parser.parse_args()
    sizes, shape = ([1024], QUICK_SHAPE) if args.smoke else (args.tokens, SHAPE)
    if any(size % args.sample_length for size in sizes):
        parser.error(f"--tokens must be multiples of --sample_length {args.sample_length}")

    work = tempfile.mkdtemp(prefix="bench_lora_memory_")
    try:
        model = os.path.join(work, "model")
        parameters = save_model(model, shape)
        rows, trl_rows = write_rows(work, STEPS * max(sizes) // args.sample_length, args.sample_length)
        config = encode(work, model, rows, args.sample_length)
        print(f"Qwen2-shaped model, {parameters / 1e6:.1f}M parameters ({shape['num_hidden_layers']} layers, hidden "
              f"{shape['hidden_size']}, vocab {shape['vocab_size']:,}, tied), fp32, CPU; samples of "
              f"{args.sample_length} tokens; {STEPS} optimizer steps per case; LoRA r={LORA_RANK} alpha "
              f"{2 * LORA_RANK} all-linear")
        base = baseline(model)
        print(f"  baseline (python + torch + transformers + model loaded): peak {base[0]:.2f} GiB  {base[1]:.1f} s")
        results = []
        for size in sizes:
            batch = size // args.sample_length
            for case in cases(args.chunk):
                if args.smoke and case.name[0] in "123":
                    continue  # the smoke run keeps case 4 (LoRA, checkpointing, chunked loss) and TRL's
                if case.trl and importlib.util.find_spec("trl") is None:
                    print(f"  {case.name:<32} n/a: trl is not installed (pip install trl to include it)")
                    continue
                results.append(run_case(case, work, config, model, trl_rows, batch, args.sample_length, args.timeout))
        print_report(results, base, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
