"""A TRL-style SFT dataset preparation, standalone, for bench/encode.py to measure as a whole process.

    python bench/trl_style_encode.py --tokenizer DIR --data rows.jsonl --out DIR [--max_length 4096] [--num_proc 2]

The steps TRL's SFTTrainer takes on a conversational prompt/completion dataset, written out here:
datasets.load_dataset("json"), then datasets.map passes with num_proc workers, each writing its result to
an Arrow cache file as datasets does by default:

1. the Alpaca row becomes `prompt` (a user message) and `completion` (an assistant message);
2. tokenize: apply_chat_template(prompt, add_generation_prompt=True) and apply_chat_template(prompt +
   completion), both tokenized by the template call, and completion_mask = 0 over the prompt's tokens and
   1 over the rest (for completion-only loss);
3. truncate input_ids and completion_mask to max_length (a batched pass);

and save_to_disk.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="Alpaca-style JSON or JSONL: instruction, input, output")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--num_proc", type=int, default=2)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    num_proc = args.num_proc if args.num_proc > 1 else None

    def to_prompt_completion(example: dict) -> dict:
        user = example["instruction"] + ("\n" + example["input"] if example["input"] else "")
        return {"prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": example["output"]}]}

    def token_ids(messages: list[dict], **kwargs) -> list[int]:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
        return list(encoded["input_ids"])

    def tokenize(example: dict) -> dict:
        prompt_ids = token_ids(example["prompt"], add_generation_prompt=True)
        input_ids = token_ids(example["prompt"] + example["completion"])
        return {"input_ids": input_ids, "completion_mask": [0] * len(prompt_ids) + [1] * (len(input_ids) - len(prompt_ids))}

    def truncate(batch: dict) -> dict:
        return {key: [values[:args.max_length] for values in batch[key]] for key in ("input_ids", "completion_mask")}

    dataset = datasets.load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc="TRL-style: prompt/completion")
    dataset = dataset.map(tokenize, remove_columns=["prompt", "completion"], num_proc=num_proc, desc="TRL-style: tokenize")
    dataset = dataset.map(truncate, batched=True, num_proc=num_proc, desc="TRL-style: truncate")
    dataset.save_to_disk(args.out)
    print(f"encoded {len(dataset):,} rows to {args.out}")


if __name__ == "__main__":
    main()
