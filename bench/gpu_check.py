"""Set up the GPU check: a Qwen2.5-0.5B-shaped model config (random init), a byte-level tokenizer, and rows
that render to exactly --sequence_length tokens, plus the run config. Used by bench/gpu_check.sh.

    python bench/gpu_check.py --out DIR [--size 0.5b|tiny] [--sequence_length 4096] [--rows 128]
"""

from __future__ import annotations

import argparse
import json
import os
import random


SHAPES = {
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4864, vocab 151,936, tied embeddings.
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def write_config(args, model: str, name: str, data: str, packing: bool, attn: str) -> None:
    """<out>/<name>.yaml: bf16, from scratch, logging every 5 steps, MFU against 790 TFLOP/s."""
    with open(os.path.join(args.out, f"{name}.yaml"), "w", encoding="utf-8") as handle:
        handle.write(f"""exp_name: gpu-check-{name}
seed: 0
output_dir: {args.out}/{name}
logging_dir: {args.out}/{name}/logs
save_steps: 100000
logging_steps: 5
eval_steps: 100000
sequence_length: {args.sequence_length}
pretrain: {model}
peak_tflops: 790
track_with: none
sft_train:
  use_sequence_packing: {str(packing).lower()}
  model_args: {{dtype: bf16, from_scratch: true, attn_implementation: {attn}}}
  training_args: {{max_steps: {args.steps}, learning_rate: 1.0e-4, per_device_train_batch_size: {args.batch}, warmup_steps: 2}}
  data_args: {{file_name: {args.out}/{data}, template: chatml}}
""")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", choices=SHAPES, default="0.5b")
    parser.add_argument("--sequence_length", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    from transformers import AutoTokenizer, Qwen2Config

    from sft.data.local_tokenizer import CHATML_JINJA, save_byte_tokenizer
    from sft.data.templates import get_template

    model = os.path.join(args.out, "model")
    save_byte_tokenizer(model, chat_template=CHATML_JINJA)
    tokenizer = AutoTokenizer.from_pretrained(model)
    # The byte tokenizer's ids are all below 300; the vocabulary is Qwen's size so the output layer costs what it
    # costs in a real 0.5B model.
    Qwen2Config(max_position_embeddings=32768, use_cache=False, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **SHAPES[args.size]).save_pretrained(model)

    template = get_template("chatml", tokenizer)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "lambda", "theta", "zeta"]
    rows = []
    for index in range(args.rows):
        prompt = f"Continue the list number {index}:"
        overhead = len(tokenizer(template.render_text([{"role": "user", "content": prompt},
                                                       {"role": "assistant", "content": ""}]),
                                 add_special_tokens=False).input_ids)
        text = ""
        while len(text) < args.sequence_length - overhead:
            text += rng.choice(words) + " "
        rows.append({"instruction": prompt, "input": "", "output": text[: args.sequence_length - overhead]})
    with open(os.path.join(args.out, "train.jsonl"), "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    # Variable lengths (64 .. sequence_length) for the packed-vs-padded comparison.
    with open(os.path.join(args.out, "variable.jsonl"), "w", encoding="utf-8") as handle:
        for index in range(args.rows * 4):
            size = rng.randint(64, args.sequence_length - 64)
            text = ""
            while len(text) < size:
                text += rng.choice(words) + " "
            handle.write(json.dumps({"instruction": f"Continue list {index}:", "input": "", "output": text[:size]}) + "\n")
    write_config(args, model, "run", "train.jsonl", packing=False, attn="auto")
    write_config(args, model, "padded", "variable.jsonl", packing=False, attn="sdpa")
    write_config(args, model, "packed", "variable.jsonl", packing=True, attn="sdpa")
    print(f"wrote {args.out}: {args.size} model config, {args.rows} rows of {args.sequence_length} tokens")


if __name__ == "__main__":
    main()
