"""Peak memory of one forward + backward of loss_sum, chunked vs not, as the target count grows (CPU).

    python bench/loss_memory.py                          # targets 1024 2048 4096, chunk 1024
    python bench/loss_memory.py --targets 2048 8192 --chunk 512
    python bench/loss_memory.py --smoke                  # 256 targets, chunk 128

A 2-layer Qwen2 with Qwen2.5's 151,936-token vocabulary and hidden size 64 (so the output layer's logits,
targets x vocabulary x 4 bytes, are all that grows), float32, one row whose every token is a target. Each
measurement is a fresh process; its peak PSS is sampled from outside (bench/memory.py), so it includes
torch's start-up. Unchunked, forward keeps targets x vocabulary logits and log-probabilities and backward
makes their gradient; chunked, only chunk x vocabulary of them exist at a time.
"""

from __future__ import annotations

import argparse
import os
import sys


VOCAB, HIDDEN = 151_936, 64


def one(targets: int, chunk_size: int) -> None:
    """Run in the measured subprocess: one forward + backward, then print the loss per token."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from sft.train.modeling import loss_sum

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_cache=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, targets + 1))
    start = time.perf_counter()
    loss, count = loss_sum(model, {"input_ids": ids, "labels": ids.clone()}, chunk_size)
    loss.backward()
    print(f"loss/token {loss.item() / count:.6f}  seconds {time.perf_counter() - start:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)  # targets chunk: the measured child
    parser.add_argument("--smoke", action="store_true", help="256 targets, chunk 128: seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args.targets, args.chunk = [256], 128
    if args.one:
        one(*args.one)
        return

    from memory import run_measured  # bench/memory.py: the script's folder is on sys.path

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    print(f"vocabulary {VOCAB:,}, hidden {HIDDEN}, float32: the logits of all targets are targets x "
          f"{VOCAB * 4 / 2**20:.2f} MiB")
    print(f"{'targets':>8} {'chunk':>6} {'logits MiB':>11} {'peak PSS MiB':>13}  result")
    for targets in args.targets:
        for chunk in (0, args.chunk):
            measured = run_measured([sys.executable, os.path.abspath(__file__), "--one", str(targets), str(chunk)],
                                    env=env, interval=0.05)
            result = measured.output.strip().splitlines()[-1] if measured.output.strip() else ""
            if measured.returncode != 0:
                result = f"failed ({measured.returncode}): {result}"
            print(f"{targets:>8} {chunk or 'none':>6} {targets * VOCAB * 4 / 2**20:>11,.0f} "
                  f"{measured.peak_pss_bytes / 2**20:>13,.0f}  {result}", flush=True)


if __name__ == "__main__":
    main()
