"""Encode JSON/JSONL data into input_ids/labels (prompt tokens masked) and save it with datasets.save_to_disk.

    python scripts/encode.py --config_path configs/demo.yaml [--out DIR] [--sft_train.data_args.template chatml ...]

Loads only the tokenizer from ``pretrain``. Writes DIR/train (and DIR/validation) and prints a report:
rows read, kept, dropped and rejected by reason, truncated, tokens, supervised tokens, length percentiles.
A second run on unchanged inputs reuses the cache (the default DIR is <output_dir>/encoded/<cache key>).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sft.cli import run_script
from sft.config import SFTConfig
from sft.data.build import build_encoded, format_report


@dataclass
class EncodeOptions:
    out: Optional[str] = None
    """Output folder; default <output_dir>/encoded/<cache key>."""


def main(config: SFTConfig, options: EncodeOptions) -> str:
    out_dir, meta, reused = build_encoded(config, options.out)
    for split, report in meta["reports"].items():
        print(format_report(split, report))
    print(f"{'Reused' if reused else 'Wrote'} {out_dir}")
    return out_dir


if __name__ == "__main__":
    run_script(main, EncodeOptions)
