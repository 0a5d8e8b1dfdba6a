"""Pack an encoded dataset into rows of at most sequence_length tokens (position_ids restart per sample).

    python scripts/pack.py --config_path configs/demo.yaml [--out DIR] [--sft_train.data_args.packing_strategy greedy]

Reads sft_train.data_args.encoded_path, or encodes the configured files first (cached, as encode.py).
Writes DIR/train (input_ids, labels, position_ids, num_samples, length) and a copy of DIR/validation
(unpacked: validation covers each sample once), and reports rows, the lower bound and the fill ratio.
Train on it with --sft_train.data_args.encoded_path DIR. Default DIR: <encoded folder>-packed-<strategy>.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from sft.cli import run_script
from sft.config import SFTConfig
from sft.data.build import META_FILE, build_encoded, read_meta
from sft.data.packing import build_packed, format_packing_report
from sft.staging import atomic_dir


@dataclass
class PackOptions:
    out: Optional[str] = None
    """Output folder; default <encoded folder>-packed-<strategy>."""


def main(config: SFTConfig, options: PackOptions) -> str:
    from sft.data.pipeline import load_encoded

    data = config.sft_train.data_args
    source = data.encoded_path or build_encoded(config)[0]
    out = options.out or f"{source.rstrip(os.sep)}-packed-{data.packing_strategy}"
    train = load_encoded(os.path.join(source, "train"))
    packed, report = build_packed(train, config.sequence_length, data.packing_strategy)
    with atomic_dir(out) as staging:  # a killed run leaves out as it was; its staging is removed by the next one
        packed.save_to_disk(os.path.join(staging, "train"))
        if os.path.isdir(os.path.join(source, "validation")):
            shutil.copytree(os.path.join(source, "validation"), os.path.join(staging, "validation"))
        with open(os.path.join(staging, "pack_meta.json"), "w", encoding="utf-8") as handle:
            json.dump({"source": source, "sequence_length": config.sequence_length,
                       "strategy": data.packing_strategy, "report": report}, handle, indent=2)
        # The source's encode meta goes along, so a run given this folder can check how it was encoded.
        meta = read_meta(source) or {}
        with open(os.path.join(staging, META_FILE), "w", encoding="utf-8") as handle:
            json.dump({**meta, "packed_sequence_length": config.sequence_length, "packed_from": source}, handle,
                      indent=2)
    print(format_packing_report(report))
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    run_script(main, PackOptions)
