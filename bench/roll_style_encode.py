"""A ROLL-style SFT encoder, standalone, for bench/encode.py to time as a whole process against ours.

    python bench/roll_style_encode.py --tokenizer DIR --data rows.json --out DIR [--sequence_length 4096] [--num_proc 1]

What ROLL's SFT pipeline does per sample, written out here: render the prompt (with the generation prompt)
and the prompt + response with the tokenizer's chat template, tokenize each of the two strings, mask the
first len(prompt_ids) labels, truncate to the sequence length; rows go through datasets.load_dataset("json")
and datasets.map, and the result is written with save_to_disk.
"""

from __future__ import annotations

import argparse

IGNORE_INDEX = -100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="Alpaca-style JSON or JSONL: instruction, input, output")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sequence_length", type=int, default=4096)
    parser.add_argument("--num_proc", type=int, default=1)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    def encode(example: dict) -> dict:
        user = example["instruction"] + ("\n" + example["input"] if example["input"] else "")
        prompt = [{"role": "user", "content": user}]
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": example["output"]}],
                                                  tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        input_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][:args.sequence_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):])[:len(input_ids)]
        return {"input_ids": input_ids, "labels": labels}

    dataset = datasets.load_dataset("json", data_files=args.data, split="train")
    encoded = dataset.map(encode, remove_columns=dataset.column_names, num_proc=args.num_proc if args.num_proc > 1 else None,
                          desc="ROLL-style encode")
    encoded.save_to_disk(args.out)
    print(f"encoded {len(encoded):,} rows to {args.out}")


if __name__ == "__main__":
    main()
