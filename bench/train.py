"""Training throughput, side by side in one run: scripts/train.py vs bare PyTorch loops vs TRL's SFTTrainer.

    python bench/train.py [--steps 24] [--batch 4]      # CPU; pip install trl to include TRL's rows
    python bench/train.py --packing [--lengths 1024 4096] [--models tiny small]
                                                        # padded vs packed (varlen)
    python bench/train.py --families [--lengths 1024]   # MoE and hybrid shapes: padded vs packed, defaults
    python bench/train.py --smoke [--packing | --families]   # the same tables from a few tiny steps

A tiny Qwen2-shaped model (hidden 64, 2 layers) with the real Qwen2.5 tokenizer's vocabulary (151,665
tokens): as in users' small models, the output layer is most of the cost. Data: alpaca_en_demo.json with
the qwen2_5 template, sequence_length 512, the same samples in the same order for every row, fp32.
Reported: effective (non-pad) tokens per second over the steps after the first quarter (warm-up).

* ours: scripts/train.py as a user runs it (numbers from its metrics.jsonl);
* bare loop, full logits: forward with labels (HF's mean loss over all positions), backward, AdamW;
* bare loop, target logits: the same with our loss (output layer only at target positions);
* TRL SFTTrainer, padded and packed (padding_free), when trl is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


QWEN_TOKENIZER = os.path.join(SHARED, "tokenizers", "qwen2.5-instruct")
# Model bodies. "tiny" with the Qwen2.5 vocabulary: the output layer is ~99% of the parameters. "small"
# with an 8,192-token vocabulary: the output layer is ~21% (Qwen2.5-0.5B: 27%, 1.5B: 15%, 7B: 7%).
SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
          "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4)}


# 2026 shapes at CPU size (vocabulary 8,192): a Qwen3-MoE body (8 experts, top 2) and a Qwen3-Next body (3 Gated
# DeltaNet layers to 1 attention layer, 8 experts), as the `auto` defaults run them (varlen; DeltaNet per sample).
FAMILY_SHAPES = {
    "qwen3_moe": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                      output_router_logits=True, router_aux_loss_coef=0.001),
    "qwen3_next": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                       shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                       linear_value_head_dim=64, output_router_logits=True, router_aux_loss_coef=0.001),
}


def small_vocab_tokenizer(folder: str, vocab_size: int = 8192) -> str:
    """A byte-level BPE of `vocab_size` tokens trained on the Alpaca texts, with Qwen's ChatML markers as
    special tokens, so the qwen2_5 template renders the same text as for the Qwen2.5 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = json.load(open(os.path.join(SHARED, "datasets", "alpaca_en_demo.json"), encoding="utf-8"))
    texts = [" ".join(str(row.get(key) or "") for key in ("instruction", "input", "output")) for row in rows]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            additional_special_tokens=special[1:]).save_pretrained(folder)
    return folder


def setup(work: str, steps: int, batch: int, sequence_length: int = 512, packing: bool = False, name: str = "run",
          shape: str = "tiny", tokenizer_dir: str = QWEN_TOKENIZER, attn: str = "sdpa") -> tuple[str, str]:
    from transformers import AutoConfig, AutoTokenizer

    model = os.path.join(work, f"model-{name}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(model)
    family, body = ("qwen2", SHAPES[shape]) if shape in SHAPES else (shape, FAMILY_SHAPES[shape])
    AutoConfig.for_model(family, vocab_size=len(tokenizer), max_position_embeddings=max(1024, sequence_length),
                         tie_word_embeddings=True, use_cache=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **body).save_pretrained(model)
    config = os.path.join(work, f"{name}.yaml")
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(f"""seed: 0
output_dir: {work}/{name}
logging_dir: {work}/{name}/logs
save_steps: 100000
logging_steps: 1
eval_steps: 100000
sequence_length: {sequence_length}
pretrain: {model}
track_with: none
sft_train:
  model_args: {{dtype: fp32, from_scratch: true, attn_implementation: {attn}}}
  training_args: {{max_steps: {steps}, learning_rate: 1.0e-4, per_device_train_batch_size: {batch}}}
  data_args: {{file_name: {os.path.join(SHARED, 'datasets', 'alpaca_en_demo.json')}, template: qwen2_5}}
  use_sequence_packing: {str(packing).lower()}
""")
    return config, model


def steady(rates: list[tuple[float, float]]) -> float:
    """Tokens per second over the steps after the first quarter: (tokens, seconds) pairs."""
    kept = rates[len(rates) // 4:]
    return sum(t for t, _ in kept) / sum(s for _, s in kept)


def ours(config: str, work: str, name: str = "run") -> float:
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config_path", config],
                   check=True, capture_output=True, cwd=ROOT)
    rows = [json.loads(line) for line in open(os.path.join(work, name, "logs", "metrics.jsonl"))]
    rows = [r for r in rows if "perf/tokens_per_second" in r]
    return steady([(r["perf/tokens_per_second"] * r["time/step"], r["time/step"]) for r in rows])


def batches(config_path: str, steps: int, batch: int):
    """The samples scripts/train.py takes at each step (same order function), collated the same way."""
    from sft.data.collate import pad_collate
    from sft.config import load_config
    from sft.data.build import build_encoded
    from sft.data.pipeline import load_encoded
    from sft.train.sampler import Layout, epoch_order, step_micro_batches

    config = load_config(config_path, [])
    folder, _, _ = build_encoded(config, log=lambda *_: None)
    data = load_encoded(os.path.join(folder, "train"))
    layout = Layout(processes=1, micro_batch=batch, accumulation=1)
    per_epoch = layout.steps_per_epoch(len(data))
    out = []
    for step in range(steps):
        epoch, in_epoch = divmod(step, per_epoch)
        indices = step_micro_batches(epoch_order(len(data), config.seed, epoch), in_epoch, 0, layout)[0]
        rows = data[indices]
        out.append(pad_collate([{"input_ids": i, "labels": l} for i, l in zip(rows["input_ids"], rows["labels"])],
                               pad_id=151643))
    return out, data


def bare(model_dir: str, step_batches, target_only: bool) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.train.modeling import loss_sum

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates = []
    for batch in step_batches:
        start = time.perf_counter()
        if target_only:
            summed, count = loss_sum(model, batch)
            loss = summed / max(count, 1)
        else:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append((float(batch["attention_mask"].sum()), time.perf_counter() - start))
    return steady(rates)


def trl_rate(model_dir: str, data, steps: int, batch: int, packed: bool, work: str) -> float | None:
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.rates, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.rates.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Pre-tokenized rows with our labels as completion mask: TRL trains on the same tokens.
    rows = data.select(range(min(len(data), steps * batch * (3 if packed else 1))))
    dataset = rows.map(lambda r: {"completion_mask": [int(label != -100) for label in r["labels"]]},
                       remove_columns=[c for c in rows.column_names if c != "input_ids"])
    timer = Timer()
    args = SFTConfig(output_dir=os.path.join(work, f"trl-{packed}"), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                     packing=packed, completion_only_loss=True, max_length=512, dataloader_num_workers=0,
                     seed=0, data_seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    # Padded: a step takes `batch` rows; packed: `batch` rows of packed samples (best-fit decreasing, no padding).
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    tokens_per_step = batch * sum(lengths) / len(lengths)
    return steady([(tokens_per_step, seconds) for seconds in timer.rates])


def accepted_attention(config_path: str, attn: str) -> str:
    """`attn`, or "auto" where this version's config does not list it yet ("auto" picks varlen; ours() checks)."""
    from sft.config import load_config
    from sft.errors import UserError

    try:
        load_config(config_path, [])
        return attn
    except UserError as error:
        if "attn_implementation" not in str(error):
            raise
    text = open(config_path, encoding="utf-8").read()
    with open(config_path, "w", encoding="utf-8") as handle:
        handle.write(text.replace(f"attn_implementation: {attn}", "attn_implementation: auto"))
    return "auto"


def attention_used(work: str, name: str) -> str:
    """The attention backend a scripts/train.py run reports in its train.log ("..., attention varlen, ...")."""
    log = open(os.path.join(work, name, "logs", "train.log"), encoding="utf-8").read()
    return log.split(", attention ", 1)[1].split(",", 1)[0]


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have been busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(value) for value in open("/proc/stat", encoding="ascii").readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# The CPU is shared: a run during which other processes took more than OTHERS_LIMIT of the machine's CPU time is
# run again (from scratch), up to RUN_ATTEMPTS times, and the least disturbed attempt is kept and reported.
OTHERS_LIMIT = 0.05
RUN_ATTEMPTS = 6


def ours_alone(config: str, work: str, name: str) -> tuple[float, float]:
    """ours(), measured while the machine is otherwise idle: (tokens/s, the share of CPU others took meanwhile)."""
    best = None
    for _ in range(RUN_ATTEMPTS):
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)  # a fresh run, never a resume
        busy, ours_cpu, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
        rate = ours(config, work, name)
        others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - ours_cpu)
        share = max(0.0, others) / ((time.perf_counter() - start) * os.cpu_count())
        if best is None or share < best[1]:
            best = (rate, share)
        if share <= OTHERS_LIMIT:
            break
        print(f"{name}: other processes took {share:.0%} of the CPU meanwhile; running it again", file=sys.stderr)
    return best


# (label, packed, attention): padded batches, packed rows per sample (varlen).
# A packed run that names sdpa runs varlen (sft/train/architectures.py): transformers' block mask over a whole row is
# no longer a mode of scripts/train.py, so the comparison is padded vs packed.
PACKING_VARIANTS = (("padded", False, "sdpa"), ("packed, varlen", True, "varlen"))
PADDED_SAMPLES = 8  # samples a step, padded to the longest


def packed_rows_per_step(sequence_length: int) -> int:
    """2 rows of 1024 a step (about 2,000 tokens, as 8 padded samples of ~200), 1 row at 2048 and longer."""
    return max(1, 2048 // sequence_length)


def packing_comparison(steps: int, lengths: list[int], shapes: list[str]) -> None:
    """scripts/train.py padded (8 samples a step, padded to the longest) vs packed rows with varlen (attention within
    each sample), at each sequence_length, for both model shapes, all in one run. Padding costs the model body, not
    the output layer (our loss computes logits at target positions only), so packing gains in proportion to the
    body's share of the work."""
    work = tempfile.mkdtemp(prefix="bench_train_packing_")
    load_before = os.getloadavg()[0]
    labels = {"tiny": "tiny, Qwen2.5 vocab 151,665 (output layer ~99%)",
              "small": "hidden 512 x 4 layers, vocab 8,192 (output layer ~21%)"}
    tokenizers = {"tiny": QWEN_TOKENIZER}
    if "small" in shapes:
        tokenizers["small"] = small_vocab_tokenizer(os.path.join(work, "tokenizer-8k"))
    results = []
    for shape in shapes:
        for sequence_length in lengths:
            rates, disturbed = [], 0.0
            for variant, packing, attn in PACKING_VARIANTS:
                name = f"{shape}-{sequence_length}-{variant.replace(', ', '-').replace(' ', '_')}"
                batch = packed_rows_per_step(sequence_length) if packing else PADDED_SAMPLES
                config, _ = setup(work, steps, batch, sequence_length=sequence_length, packing=packing, name=name,
                                  shape=shape, tokenizer_dir=tokenizers[shape], attn=attn)
                accepted_attention(config, attn)
                rate, others = ours_alone(config, work, name)
                rates.append(rate)
                disturbed = max(disturbed, others)
                used = attention_used(work, name)
                if used != attn:
                    raise SystemExit(f"{name}: ran with attention {used}, not {attn}")
            results.append((labels[shape], sequence_length, *rates, disturbed))
    print(f"\nscripts/train.py on alpaca_en_demo (qwen2_5 template), {steps} steps, fp32, CPU, 1-minute load "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; effective (non-pad) tokens/s after warm-up. "
          f"padded: {PADDED_SAMPLES} samples a step; packed: 2 rows of <= 1024 tokens a step at 1024, 1 row at 4096, "
          "attention within each sample (varlen)\n")
    print(f"| {'model':<54} | {'length':>6} | {'padded':>7} | {'packed':>7} | {'packed / padded':>15} | {'others':>6} |")
    print(f"|{'-' * 56}|{'-' * 7}:|{'-' * 8}:|{'-' * 8}:|{'-' * 16}:|{'-' * 7}:|")
    for label, sequence_length, padded, varlen, disturbed in results:
        print(f"| {label:<54} | {sequence_length:>6} | {padded:>7,.0f} | {varlen:>7,.0f} | {varlen / padded:>15.2f} | "
              f"{disturbed:>6.0%} |")
    print(f"\nothers: the most CPU other processes took during the row's runs (a run is repeated, up to "
          f"{RUN_ATTEMPTS} times, while others take more than {OTHERS_LIMIT:.0%})")


def family_comparison(steps: int, lengths: list[int]) -> None:
    """scripts/train.py with the defaults (attn auto) on MoE and hybrid shapes: padded (8 samples a step) vs
    packed rows (2 rows of 1024 a step), in one run. Packed rows run the router loss per sample and, for
    Qwen3-Next, the Gated DeltaNet layers once per sample (sft/train/hybrid.py)."""
    work = tempfile.mkdtemp(prefix="bench_train_families_")
    tokenizer = small_vocab_tokenizer(os.path.join(work, "tokenizer-8k"))
    load_before = os.getloadavg()[0]
    results = []
    for family in FAMILY_SHAPES:
        for sequence_length in lengths:
            rates, disturbed = [], 0.0
            for packing in (False, True):
                name = f"{family}-{sequence_length}-{'packed' if packing else 'padded'}"
                batch = packed_rows_per_step(sequence_length) if packing else PADDED_SAMPLES
                config, _ = setup(work, steps, batch, sequence_length=sequence_length, packing=packing, name=name,
                                  shape=family, tokenizer_dir=tokenizer, attn="auto")
                rate, others = ours_alone(config, work, name)
                rates.append(rate)
                disturbed = max(disturbed, others)
            results.append((family, sequence_length, attention_used(work, name), *rates, disturbed))
    print(f"\nscripts/train.py, defaults (attn auto, router loss on), alpaca_en_demo (qwen2_5 template), {steps} steps, "
          f"fp32, CPU, 1-minute load {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; effective (non-pad) "
          f"tokens/s after warm-up. padded: {PADDED_SAMPLES} samples a step; packed: rows of <= the length\n")
    print(f"| {'model':<11} | {'length':>6} | {'attention':>9} | {'padded':>7} | {'packed':>7} | {'packed / padded':>15} | "
          f"{'others':>6} |")
    print(f"|{'-' * 13}|{'-' * 7}:|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|{'-' * 16}:|{'-' * 7}:|")
    for family, sequence_length, used, padded, packed, disturbed in results:
        print(f"| {family:<11} | {sequence_length:>6} | {used:>9} | {padded:>7,.0f} | {packed:>7,.0f} | "
              f"{packed / padded:>15.2f} | {disturbed:>6.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--packing", action="store_true", help="compare padded vs packed training instead")
    parser.add_argument("--families", action="store_true", help="padded vs packed on MoE and hybrid shapes")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="--packing: sequence lengths")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES),
                        help="--packing: model shapes")
    parser.add_argument("--smoke", action="store_true",
                        help="4 steps of batch 1; --packing: the tiny model at length 256; --families: length 256 "
                             "(seconds to a minute; the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.models = 4, 1, ["tiny"]
        args.lengths = [256]
    if args.families:
        family_comparison(args.steps, args.lengths if args.lengths != [1024, 4096] or args.smoke else [1024])
        return
    if args.packing:
        packing_comparison(args.steps, args.lengths, args.models)
        return
    work = tempfile.mkdtemp(prefix="bench_train_")
    config, model_dir = setup(work, args.steps, args.batch)
    step_batches, data = batches(config, args.steps, args.batch)
    results = [
        ("scripts/train.py (ours)", ours(config, work)),
        ("bare loop, full logits (HF labels= loss)", bare(model_dir, step_batches, target_only=False)),
        ("bare loop, target-position logits (our loss)", bare(model_dir, step_batches, target_only=True)),
        ("TRL SFTTrainer, padded", trl_rate(model_dir, data, args.steps, args.batch, False, work)),
        ("TRL SFTTrainer, packed (bfd, padding-free)", trl_rate(model_dir, data, args.steps, args.batch, True, work)),
    ]
    ours_rate = results[0][1]
    same_loss = results[2][1]
    print(f"\ntiny Qwen2 (hidden 64, 2 layers, vocab 151,665), alpaca_en_demo, batch {args.batch}, {args.steps} steps, "
          "fp32, CPU; effective (non-pad) tokens/s after warm-up\n")
    print(f"| {'loop':<46} | {'tokens/s':>9} | {'ours / this':>11} |")
    print(f"|{'-' * 48}|{'-' * 10}:|{'-' * 12}:|")
    for name, rate in results:
        if rate is None:
            print(f"| {name:<46} | {'n/a':>9} | {'(not installed)':>11} |")
        else:
            print(f"| {name:<46} | {rate:>9,.0f} | {ours_rate / rate:>11.2f} |")
    print(f"\ntrainer overhead vs the bare loop with the same loss: {1 - ours_rate / same_loss:+.1%} "
          "(negative: ours is faster)")


if __name__ == "__main__":
    main()
