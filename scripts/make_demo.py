"""Write the demo's bundled files: a tiny Qwen2-shaped model config, a byte-level tokenizer, and a small dataset.

    python scripts/make_demo.py            # rewrites configs/demo/ (deterministic; the files are committed)

The task is writing numbers in words ("Write 347 in words." -> "three hundred forty-seven"): small
enough for a CPU in a minute or two, and the answers to held-out numbers show whether the model learned.
"""

from __future__ import annotations

import json
import os
import random

from sft.data.local_tokenizer import CHATML_JINJA, save_byte_tokenizer

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo")
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
PROMPTS = ["Write {n} in words.", "Spell out the number {n}.", "How do you say {n} in words?"]
HELD_OUT = [47, 118, 360, 509, 712, 981]
SHORT_REPEATS = 3


def words(number: int) -> str:
    if number < 20:
        return ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])
    hundreds, rest = divmod(number, 100)
    return ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + words(rest))


def main() -> None:
    rng = random.Random(0)
    numbers = [n for n in range(1000) if n not in HELD_OUT]
    rng.shuffle(numbers)
    validation, train = numbers[:60], numbers[60:]
    # Every training number in each phrasing (shuffled), so no phrasing is tied to particular numbers. Numbers
    # below 100 are one in ten of 0-999: seen that rarely, a two-digit prompt got a hundreds word ('four hundred
    # seventy-seven' for 47, in every measured run), so each of them comes SHORT_REPEATS times.
    train_rows = [(prompt, number) for number in train for prompt in PROMPTS
                  for _ in range(SHORT_REPEATS if number < 100 else 1)]
    rng.shuffle(train_rows)
    validation_rows = [(rng.choice(PROMPTS), number) for number in validation]
    os.makedirs(DEMO, exist_ok=True)
    for name, rows in (("train.jsonl", train_rows), ("validation.jsonl", validation_rows)):
        with open(os.path.join(DEMO, name), "w", encoding="utf-8") as handle:
            for prompt, number in rows:
                row = {"instruction": prompt.format(n=number), "input": "", "output": words(number)}
                handle.write(json.dumps(row) + "\n")
    model = os.path.join(DEMO, "model")
    tokenizer = save_byte_tokenizer(model, with_bos=False, chat_template=CHATML_JINJA)
    from transformers import AutoTokenizer, Qwen2Config

    loaded = AutoTokenizer.from_pretrained(tokenizer)
    # The first two layers attend within a 4-token window (a digit and the 3 tokens before it), where each digit
    # learns its place in the number; with full attention only, a run mixes up the digits of unseen numbers
    # (measured: ~70% of validation answers right even after 2,000 steps, against 98% with these after 1,000).
    # Full multi-head attention (no shared key/value heads) and a narrow MLP also generalize better here than a
    # wide MLP, which memorizes the training numbers.
    Qwen2Config(
        vocab_size=len(loaded), hidden_size=192, intermediate_size=192, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=6, layer_types=["sliding_attention"] * 2 + ["full_attention"] * 2, use_sliding_window=True,
        sliding_window=4, max_position_embeddings=512, tie_word_embeddings=True, use_cache=False,
        eos_token_id=loaded.eos_token_id, pad_token_id=loaded.pad_token_id, bos_token_id=None,
    ).save_pretrained(model)
    print(f"wrote {DEMO}: {len(train_rows)} train rows ({len(train)} numbers x {len(PROMPTS)} phrasings, those below "
          f"100 x {SHORT_REPEATS}), "
          f"{len(validation_rows)} validation rows, held out {HELD_OUT}")

if __name__ == "__main__":
    main()
