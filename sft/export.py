"""Finding, loading and exporting a checkpoint's model: what scripts/export.py and scripts/chat.py share
(answers themselves come from sft.generation).

A ``--checkpoint`` / ``--model`` DIR names one model folder::

    DIR                                              the model folder
    a model folder (a checkpoint's <cluster_name>/,  DIR itself
      an export, any HF model folder)
    <output_dir>/sft_train/checkpoint-<step>/        its <cluster_name>/: the one child folder holding config.json
                                                     or adapter_config.json (--cluster_name picks one of several)
    <output_dir>/  or  <output_dir>/sft_train/       that of the newest complete checkpoint
    <output_dir>/best                                that of the checkpoint with the lowest validation loss
                                                     (named in <output_dir>/sft_train/best.json)

A model folder holds a whole model (config.json, safetensors) or a LoRA adapter (adapter_config.json, whose
``base_model_name_or_path`` names the base model folder), and the tokenizer and template.json (the chat
template the run trained with; ``native`` when absent). A checkpoint folder without its ``COMPLETE`` marker
was cut off while saving and is refused.

An export is a whole model in the base's dtype that ``AutoModelForCausalLM.from_pretrained`` loads, with the
tokenizer (and its Jinja chat template, when it has one) and template.json. It is written under a staging name
next to ``--out`` and renamed when complete.

torch, transformers and PEFT are imported only where a model is loaded, so mistakes in the command line or
the folders are reported before that (in well under a second).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Optional

from sft.train import checkpoint as ckpt
from sft.config.specs import looks_like_hub_id
from sft.staging import atomic_dir
from sft.errors import UserError

MODEL_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFAULT_TEMPLATE = "native"  # what a model folder without template.json was trained with
_CHECKPOINT_NAME = re.compile(r"^(\.tmp-)?checkpoint-\d+$")


class ExportError(UserError):
    """A folder given to export.py or chat.py is not what it must be (missing, incomplete, not a model)."""


# ----- which model folder ---------------------------------------------------------------------------

def _is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG)) or ckpt.is_adapter(path)


def _looks_like_checkpoint(path: str) -> bool:
    return bool(_CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path)))) or \
        os.path.isfile(os.path.join(path, ckpt.STATE_FILE))


def _model_children(path: str) -> list[str]:
    """Names of the model folders in a checkpoint folder (its <cluster_name>/)."""
    return sorted(name for name in os.listdir(path)
                  if name != ckpt.TRAINING_STATE and _is_model_folder(os.path.join(path, name)))


def _holds_checkpoints(path: str) -> bool:
    return any(_CHECKPOINT_NAME.match(name) for name in os.listdir(path))


def _refuse_incomplete(checkpoint: str, given: str, flag: str) -> None:
    if _looks_like_checkpoint(checkpoint) and not ckpt.is_complete(checkpoint):
        raise ExportError(f"{flag} {given}: checkpoint {checkpoint} is not complete (no {ckpt.COMPLETE} marker: it was "
                          "cut off while saving); use a complete one")


def find_model_folder(path: str, cluster_name: Optional[str] = None, flag: str = "--checkpoint") -> str:
    """The model folder that ``path`` names (see the module docstring); ``flag`` names the option in errors."""
    if os.path.basename(path.rstrip(os.sep)) == "best" and not os.path.exists(path):
        output_dir = os.path.dirname(path.rstrip(os.sep)) or "."
        best = ckpt.best_checkpoint(output_dir)
        if best is None:
            raise ExportError(f"{flag} {path}: no best checkpoint is recorded in {ckpt.checkpoints_root(output_dir)} "
                              "(a run with validation data records one at each save: best.json)")
        path = best
    if not os.path.isdir(path):
        raise ExportError(f"{flag} {path}: no such folder")
    if _is_model_folder(path):
        _refuse_incomplete(os.path.dirname(os.path.abspath(path)), path, flag)
        return path
    checkpoint, children = path, _model_children(path)
    if not children:  # an output_dir, or its sft_train/ folder of checkpoints: the newest complete checkpoint
        output_dir = os.path.dirname(os.path.abspath(path)) if _holds_checkpoints(path) else path
        if os.path.isdir(ckpt.checkpoints_root(output_dir)):
            checkpoint = ckpt.latest_checkpoint(output_dir)
            if checkpoint is None:
                raise ExportError(f"{flag} {path}: an output_dir with no complete checkpoint in "
                                  f"{ckpt.checkpoints_root(output_dir)} yet")
            children = _model_children(checkpoint)
    if cluster_name is not None:
        if cluster_name not in children:
            raise ExportError(f"{flag} {checkpoint} has no model folder {cluster_name}/ (with {MODEL_CONFIG} or "
                              f"{ckpt.ADAPTER_CONFIG}); it has: {', '.join(children) or 'none'}")
        name = cluster_name
    elif len(children) == 1:
        name = children[0]
    elif not children:
        raise ExportError(f"{flag} {path}: not a checkpoint, model folder or output_dir (no {MODEL_CONFIG} or "
                          f"{ckpt.ADAPTER_CONFIG} in it or in a folder in it, and no sft_train/ checkpoints)")
    else:
        raise ExportError(f"{flag} {checkpoint} holds several model folders ({', '.join(children)}); pick one "
                          "with --cluster_name")
    _refuse_incomplete(checkpoint, path, flag)
    return ckpt.model_dir(checkpoint, name)


@dataclass(frozen=True)
class ModelSource:
    """A model folder and what loading it takes: the base model an adapter goes onto, the chat template."""

    folder: str
    base: Optional[str]  # the base model of a LoRA adapter; None for a whole model
    template: str        # a name for sft.data.templates.get_template
    template_switches: dict = field(default_factory=dict)  # its chat_template_kwargs
    template_jinja: Optional[str] = None  # a Jinja-file template's text

    @property
    def adapter(self) -> bool:
        return self.base is not None

    def describe(self) -> str:
        return f"LoRA adapter {self.folder} on base {self.base}" if self.adapter else f"model {self.folder}"

    def tokenizer_folder(self) -> str:
        """The model folder when it holds tokenizer files (checkpoints do), else an adapter's base."""
        if any(os.path.isfile(os.path.join(self.folder, name)) for name in TOKENIZER_FILES) or not self.adapter:
            return self.folder
        return self.base


def model_source(folder: str, base: Optional[str] = None) -> ModelSource:
    """What ``folder`` holds; ``base`` overrides the base model an adapter's adapter_config.json names."""
    template = ckpt.saved_template(folder) or DEFAULT_TEMPLATE
    switches, jinja = ckpt.saved_template_settings(folder)
    if not ckpt.is_adapter(folder):
        if base is not None:
            raise ExportError(f"--base {base}: {folder} is a whole model, not a LoRA adapter; drop --base")
        return ModelSource(folder, None, template, switches, jinja)
    with open(os.path.join(folder, ckpt.ADAPTER_CONFIG), encoding="utf-8") as handle:
        recorded = json.load(handle).get("base_model_name_or_path")
    chosen = base or recorded
    if not chosen:
        raise ExportError(f"{os.path.join(folder, ckpt.ADAPTER_CONFIG)} names no base model; give its folder with "
                          "--base DIR")
    # A base that is not a local folder may be a Hub id (org/name), which transformers finds in its cache.
    if not os.path.isdir(chosen) and not (looks_like_hub_id(chosen) and not os.path.exists(chosen)):
        where = "--base" if base else f"{ckpt.ADAPTER_CONFIG}'s base_model_name_or_path"
        raise ExportError(f"base model folder {chosen} (from {where}) does not exist; if the base has moved, give "
                          "its folder with --base DIR")
    return ModelSource(folder, chosen, template, switches, jinja)


# ----- loading ----------------------------------------------------------------------------------------

def load_tokenizer(source: ModelSource):
    from sft.data.build import load_tokenizer as load_fast_tokenizer

    return load_fast_tokenizer(source.tokenizer_folder())


def load_template(source: ModelSource, tokenizer, name: Optional[str] = None):
    """The chat template to prompt with: ``name``, else the one the folder records (native when none)."""
    from sft.data.templates import TemplateError, get_template

    recorded = name is None or name == source.template
    name = name or source.template
    try:
        if recorded:  # with the switches it was trained with (and a Jinja file's recorded text)
            return get_template(name, tokenizer, source.template_switches, jinja=source.template_jinja)
        return get_template(name, tokenizer)
    except TemplateError as error:
        if name == DEFAULT_TEMPLATE and not tokenizer.chat_template:
            raise ExportError(f"{source.folder}: template native is the tokenizer's own chat template, and it has "
                              "none; choose a template with --template (chatml, qwen2_5, qwen3, llama3, base, alpaca)"
                              ) from None
        raise ExportError(f"--template {name}: {error}" if name != source.template else str(error)) from None


def load_model(source: ModelSource, merge: bool = False, device: str = "cpu"):
    """The model in eval mode on ``device``, in its stored dtype: an adapter on its base (a PeftModel), or,
    with ``merge``, merged into the base's weights (a plain transformers model)."""
    from transformers import AutoModelForCausalLM

    path = source.base if source.adapter else source.folder
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except OSError as error:  # a missing weight file, or a Hub id that is neither cached nor reachable
        hint = "; give the base model folder with --base DIR" if source.adapter else ""
        raise ExportError(f"cannot load the model in {path}: {error}{hint}") from None
    if source.adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, source.folder)
        except (RuntimeError, ValueError) as error:  # shapes or module names of another base
            raise ExportError(f"the adapter {source.folder} does not fit the base model {source.base} ({error}); "
                              "give the base it was trained on with --base DIR") from None
        if merge:
            model = model.merge_and_unload()
    return model.to(device).eval()


def parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def stored_parameter_count(folder: str) -> Optional[int]:
    """Parameters in a model folder's safetensors files, read from their headers (None: no safetensors)."""
    from safetensors import safe_open

    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not files:
        return None
    total = 0
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


# ----- export -----------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    """What export() wrote, for the summary line."""

    kind: str  # "merged" or "copied"
    source: ModelSource
    parameters: Optional[int]
    dtype: str
    out: str
    note: str = ""

    def summary(self) -> str:
        count = f"{self.parameters:,} parameters" if self.parameters is not None else "parameters not counted"
        what = "merged LoRA adapter + base" if self.kind == "merged" else "copied full model"
        note = f" ({self.note})" if self.note else ""
        return (f"exported {what} from {self.source.describe()}{note} | {count} | {self.dtype} | "
                f"template {self.source.template} -> {self.out}")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out(out: str, source: ModelSource, overwrite: bool) -> None:
    """Refuse an --out that holds something (unless overwrite) or overlaps the folders it is made from."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out}: is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty; choose another folder, or pass --overwrite to "
                          "replace it")
    made_from = [source.folder] + ([source.base] if source.adapter and os.path.isdir(source.base) else [])
    checkpoint = os.path.dirname(os.path.abspath(source.folder))
    if _looks_like_checkpoint(checkpoint):  # an export inside a checkpoint would be a second model folder in it
        made_from.append(checkpoint)
    for folder in made_from:
        if _inside(out, folder) or _inside(folder, out):
            raise ExportError(f"--out {out}: overlaps {folder}, which the export is made from; choose a folder "
                              "outside it")


def export(source: ModelSource, out: str, merge: bool, overwrite: bool = False) -> ExportResult:
    """Write ``source`` as a standalone HF model folder at ``out`` (see the module docstring).

    A whole model is copied file by file (``merge`` changes nothing); an adapter needs ``merge``: it is loaded
    onto its base, merged, and saved in the base's dtype.
    """
    if source.adapter and not merge:
        raise ExportError(f"{source.folder} is a LoRA adapter: pass --merge to write a standalone model (base + "
                          "adapter merged). The adapter folder itself already loads with PEFT onto its base "
                          f"({source.base}), e.g. scripts/chat.py --model {source.folder}")
    if not source.adapter and not any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(source.folder)):
        raise ExportError(f"{source.folder} holds no weights (no .safetensors or .bin file); nothing to export")
    check_out(out, source, overwrite)
    with atomic_dir(out) as staging:  # out is replaced only by a whole export (it is empty, or --overwrite)
        if source.adapter:
            tokenizer = load_tokenizer(source)
            model = load_model(source, merge=True)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)  # writes its Jinja chat template too, when it has one
            result = ExportResult("merged", source, parameter_count(model), str(model.dtype).removeprefix("torch."), out)
        else:
            shutil.copytree(source.folder, staging, dirs_exist_ok=True)
            note = "--merge: a full-weight checkpoint, nothing to merge" if merge else ""
            result = ExportResult("copied", source, stored_parameter_count(staging), _stored_dtype(staging), out, note)
        ckpt.write_template(staging, source.template, source.template_switches, source.template_jinja)
    return result


def _stored_dtype(folder: str) -> str:
    with open(os.path.join(folder, MODEL_CONFIG), encoding="utf-8") as handle:
        config = json.load(handle)
    return str(config.get("dtype") or config.get("torch_dtype") or "unknown")

