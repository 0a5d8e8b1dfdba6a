"""Packed vs unpacked loss and gradients on this machine's device and dtype (bf16 on a GPU, float64 on CPU).

    python bench/packing_check.py [--attn sdpa] [--dtype bf16] [--smoke]

Prints the relative difference of the summed loss and of the gradient norm between a padded batch of
samples and the same samples packed into rows (position_ids restarting, no attention mask).
"""

from __future__ import annotations

import argparse
import random



def main() -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.data.collate import pad_collate
    from sft.train.modeling import loss_sum
    from sft.data.packing import pack_bins, packed_collate, packed_row

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser()
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--dtype", default="bf16" if on_gpu else "fp64", choices=["bf16", "fp32", "fp64"])
    parser.add_argument("--smoke", action="store_true", help="6 samples of at most 200 tokens (the tests run it)")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, use_cache=False, attn_implementation=args.attn)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    rng = random.Random(0)
    samples = []
    for _ in range(6 if args.smoke else 16):
        length = rng.randint(32, 200 if args.smoke else 900)
        ids = [rng.randint(1, 1023) for _ in range(length)]
        prompt = rng.randint(1, length // 2)
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})

    def run(batch):
        model.zero_grad(set_to_none=True)
        summed, count = loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        summed.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
        return float(summed.detach()), count, float(norm)

    unpacked = run(pad_collate(samples, pad_id=0))
    rows = pack_bins([len(s["input_ids"]) for s in samples], 2048)
    packed = run(packed_collate([packed_row([samples[i] for i in row]) for row in rows], pad_id=0))
    assert packed[1] == unpacked[1]
    print(f"packing_check: device {device} | attention {args.attn} | dtype {args.dtype} | {len(samples)} samples in "
          f"{len(rows)} rows | loss rel diff {abs(packed[0] - unpacked[0]) / abs(unpacked[0]):.2e} | "
          f"grad-norm rel diff {abs(packed[2] - unpacked[2]) / unpacked[2]:.2e}")


if __name__ == "__main__":
    main()
