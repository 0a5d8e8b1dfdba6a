"""TRL's side of bench/lora_memory.py: SFTTrainer + PEFT LoRA + gradient checkpointing, as one process.

    python bench/trl_case.py --model MODEL_DIR --data rows.jsonl --batch 8 --steps 2 --max_length 520 --out DIR

The rows are prompt/completion conversations ({"prompt": [user message], "completion": [assistant message]}),
rendered by the tokenizer's own chat template, with the loss on the completion only (TRL's default for
prompt/completion data). LoRA r=16, alpha 32, on all linear layers but the output layer; fp32 (bf16 off), no
evaluation, no saving, no reporting. bench/lora_memory.py measures this process from outside; it reads the
last line printed, `TRL_TOKENS {json}`: the tokens and supervised tokens of each optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model and tokenizer folder (weights saved)")
    parser.add_argument("--data", required=True, help="prompt/completion JSONL")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max_length", type=int, required=True, help="above the longest sample: nothing truncated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", required=True, help="TRL's output_dir (nothing is saved there)")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    class CountingTrainer(SFTTrainer):
        """Records the tokens and the supervised tokens of every micro-batch it trains on."""

        counts: list[tuple[int, int]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            self.counts.append((int(inputs["attention_mask"].sum()), int((labels[:, 1:] != -100).sum())))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, learning_rate=1e-4, gradient_checkpointing=True,
                       bf16=False, fp16=False, use_cpu=True, max_length=args.max_length, completion_only_loss=True,
                       packing=False, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1,
                       dataloader_num_workers=0, seed=0, data_seed=0, dataset_num_proc=None)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = CountingTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"TRL {type(trainer.model).__name__}: {trainable / 1e6:.2f}M trainable, gradient checkpointing "
          f"{trainer.args.gradient_checkpointing} {trainer.args.gradient_checkpointing_kwargs}", flush=True)
    trainer.train()
    steps = [{"tokens": tokens, "targets": targets} for tokens, targets in CountingTrainer.counts]
    print("TRL_TOKENS " + json.dumps(steps), flush=True)


if __name__ == "__main__":
    main()
