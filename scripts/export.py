"""Export a checkpoint as a standalone HF model folder that AutoModelForCausalLM.from_pretrained loads.

    python scripts/export.py --checkpoint OUTPUT_DIR/sft_train/checkpoint-1000 --out exported [--merge]
    python scripts/export.py --checkpoint OUTPUT_DIR --out exported --merge        # the newest complete checkpoint
    python scripts/export.py --checkpoint CKPT --out exported --merge --base /new/place/of/base --overwrite

--checkpoint is a checkpoint folder (its <cluster_name>/ model folder is used), the model folder itself, or an
output_dir (its newest complete checkpoint). What is written to --out:

* a LoRA checkpoint with --merge: the base model (adapter_config.json's base_model_name_or_path, or --base)
  with the adapter merged into its weights, saved as safetensors in the base's dtype;
* a LoRA checkpoint without --merge: refused. The adapter folder already loads with PEFT onto its base (and
  chat.py takes it as it is); an export promises a model that loads without PEFT and without the base;
* a full-weight checkpoint: a plain copy of the model folder (--merge is accepted and changes nothing).

Each export holds the tokenizer (with its Jinja chat template when it has one; none is made up) and
template.json, the chat template the run trained with, which chat.py reads. One line sums it up: what was
exported, from where, the parameter count and the folder. An existing non-empty --out is refused unless
--overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sft.cli import run_tool
from sft.export import ExportResult, export, find_model_folder, model_source


@dataclass
class ExportOptions:
    """What to export, and where to."""

    checkpoint: str
    """A checkpoint folder, its <cluster_name>/ model folder, or an output_dir (its newest complete checkpoint)."""
    out: str
    """The folder to write the standalone model to; must not exist or be empty (see --overwrite)."""
    merge: bool = False
    """Merge a LoRA adapter into its base model (required for a LoRA checkpoint; nothing to do for a full one)."""
    base: Optional[str] = None
    """The adapter's base model folder, when it is no longer where adapter_config.json says."""
    cluster_name: Optional[str] = None
    """The model folder in the checkpoint, when it holds several (default: the only one)."""
    overwrite: bool = False
    """Replace a non-empty --out."""


def main(options: ExportOptions) -> ExportResult:
    folder = find_model_folder(options.checkpoint, options.cluster_name, flag="--checkpoint")
    source = model_source(folder, options.base)
    result = export(source, options.out, merge=options.merge, overwrite=options.overwrite)
    print(result.summary())
    return result


if __name__ == "__main__":
    run_tool(main, ExportOptions)
