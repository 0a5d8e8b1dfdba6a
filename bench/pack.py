"""Packing quality and speed, side by side in one run: ours (best-fit decreasing, then re-packing of the
rows it leaves loose) vs best-fit decreasing alone vs TRL's pack_dataset (bfd).

    python bench/pack.py            # pip install trl to include TRL's rows
    python bench/pack.py --smoke    # one file, one row length: seconds

Lengths: the shared datasets encoded with the Qwen2.5 tokenizer and the qwen2_5 template:
Alpaca-style rows (alpaca_en_demo + code_alpaca_2k, replicated to 50,000 rows) and the ShareGPT sample
(multi-turn), each cut to the row length (what overlong: truncate does). For each row length:
rows over the lower bound ceil(tokens / length), fill ratio and time; the Martello-Toth bound (no packing
of these lengths has fewer rows) is shown where it is higher. TRL is run as SFTTrainer runs it
(its map's default 1,000-row batches, BFD per batch) and as one global BFD. Last, the time to pack
1,000,000 synthetic lengths.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def dataset_lengths(tokenizer, smoke: bool = False) -> dict[str, list[int]]:
    from sft.data.conversation import FieldMapping
    from sft.data.encoding import EncodeSettings
    from sft.data.pipeline import encode_split
    from sft.data.templates import get_template

    template = get_template("qwen2_5", tokenizer)
    single = FieldMapping()
    alpaca = []
    for name in ("alpaca_en_demo.json",) if smoke else ("alpaca_en_demo.json", "code_alpaca_2k.json"):
        result = encode_split([os.path.join(SHARED, "datasets", name)], template, tokenizer,
                              EncodeSettings(single, 10**7, on_bad_sample="skip"), desc=name)
        alpaca += result.dataset["length"]
    if smoke:
        return {"Alpaca-style 2k": [alpaca[i % len(alpaca)] for i in range(2_000)]}
    sharegpt = encode_split([os.path.join(SHARED, "datasets", "sharegpt_v3_sample_1000.json")], template, tokenizer,
                            EncodeSettings(FieldMapping(messages_key="conversations"), 10**7, on_bad_sample="skip"),
                            desc="sharegpt").dataset["length"]
    return {"Alpaca-style 50k": [alpaca[i % len(alpaca)] for i in range(50_000)], "ShareGPT 981": sharegpt}


def ours(lengths: list[int], capacity: int, repack: bool = True) -> tuple[int, float]:
    from sft.data.packing import pack_best_fit_decreasing, pack_bins

    start = time.perf_counter()
    rows = (pack_bins if repack else pack_best_fit_decreasing)(lengths, capacity)
    return len(rows), time.perf_counter() - start


def trl(lengths: list[int], capacity: int, global_bfd: bool):
    try:
        from trl.data_utils import pack_dataset
    except ImportError:
        return None
    import datasets

    dataset = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    start = time.perf_counter()
    packed = pack_dataset(dataset, capacity, strategy="bfd",
                          map_kwargs={"batch_size": len(dataset)} if global_bfd else None)
    return len(packed), time.perf_counter() - start


def main() -> None:
    from transformers import AutoTokenizer

    from sft.data.packing import lower_bound

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="alpaca_en_demo only, rows of 1024, 20,000 synthetic lengths: seconds (the tests run it)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(SHARED, "tokenizers", "qwen2.5-instruct"))
    data = dataset_lengths(tokenizer, args.smoke)
    synthetic_count = 20_000 if args.smoke else 1_000_000
    lines = []
    for name, full in data.items():
        for capacity in (1024,) if args.smoke else (1024, 2048, 4096):
            lengths = [min(n, capacity) for n in full]
            bound = math.ceil(sum(lengths) / capacity)
            tight = lower_bound(lengths, capacity)
            if tight > bound:
                lines.append(f"| {name:<16} | {capacity:>5} | {'(no packing has fewer rows)':<27} | {tight:>6,} | "
                             f"{tight / bound:>8.4f} | {sum(lengths) / (tight * capacity):>6.1%} | {'':>8} |")
            cells = [("ours (BFD + re-packing)", ours(lengths, capacity)),
                     ("ours, BFD alone", ours(lengths, capacity, repack=False)),
                     ("TRL bfd, 1,000-row batches", trl(lengths, capacity, False)),
                     ("TRL bfd, global", trl(lengths, capacity, True))]
            for packer, result in cells:
                if result is None:
                    lines.append(f"| {name:<16} | {capacity:>5} | {packer:<27} | {'n/a':>6} | {'':>8} | {'':>6} | {'':>8} |")
                    continue
                rows, seconds = result
                lines.append(f"| {name:<16} | {capacity:>5} | {packer:<27} | {rows:>6,} | {rows / bound:>8.4f} | "
                             f"{sum(lengths) / (rows * capacity):>6.1%} | {seconds:>7.3f}s |")
    rng = random.Random(0)
    synthetic = [min(4096, int(rng.lognormvariate(5.0, 1.0)) + 1) for _ in range(synthetic_count)]
    rows, seconds = ours(synthetic, 4096)
    bound = math.ceil(sum(synthetic) / 4096)
    print("\nrows over the lower bound ceil(tokens / row length); fill = tokens / (rows x row length)\n")
    print(f"| {'data':<16} | {'rows':>5} | {'packer':<27} | {'bins':>6} | {'x bound':>8} | {'fill':>6} | {'time':>8} |")
    print(f"|{'-' * 18}|{'-' * 6}:|{'-' * 29}|{'-' * 7}:|{'-' * 9}:|{'-' * 7}:|{'-' * 9}:|")
    print("\n".join(lines))
    print(f"\n{synthetic_count:,} synthetic lengths (log-normal, mean ~245) into rows of 4096: ours {seconds:.2f}s, "
          f"{rows:,} rows, x bound {rows / bound:.5f}")


if __name__ == "__main__":
    main()
