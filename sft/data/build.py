"""Building the encoded dataset on disk, with a content-keyed cache. Used by scripts/encode.py and train.py.

Layout of an encoded folder (``datasets.save_to_disk``'s layout per split, written by sft.data.pipeline)::

    DIR/train/            input_ids, labels, length, source
    DIR/validation/       (when validation.data_args.file_name is set)
    DIR/encode_meta.json  cache key, what went into it, and the report of each split
    DIR/rejects-train.jsonl, DIR/rejects-validation.jsonl   (rows skipped with on_bad_sample: skip)

The folder is written under a temporary name and renamed when complete, so a folder with
``encode_meta.json`` is always whole. A run whose cache key matches reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Optional

from sft.config import SFTConfig
from sft.config.sections import is_jinja_file
from sft.files import file_digest
from sft.data.conversation import FieldMapping
from sft.errors import ConfigError, DataError
from sft.data.encoding import EncodeSettings
from sft.data.pipeline import encode_split
from sft.staging import atomic_dir
from sft.data.sources import source_fingerprint
from sft.data.templates import get_template

# Bump when the encoder's output for the same inputs changes, so old caches are not reused.
ENCODER_VERSION = 3  # 2: tools, tool calls, reasoning, generation-faithful splits; 3: bad-row rules (duplicate
# keys, lone surrogates, reasoning twice), prompt/completion rows, notes
META_FILE = "encode_meta.json"


def load_tokenizer(pretrain: str):
    """The fast tokenizer of ``pretrain`` (a folder that may hold only tokenizer files, or a hub id).

    For a local folder the class named in its tokenizer_config.json is loaded directly: the same tokenizer
    AutoTokenizer builds, without AutoTokenizer's import of transformers' model configuration code, which
    imports torch (over a second of scripts/encode.py's start-up). Anything else goes through AutoTokenizer.
    """
    import transformers

    loader = None
    config_file = os.path.join(pretrain, "tokenizer_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as handle:
                named = json.load(handle).get("tokenizer_class")
        except (OSError, json.JSONDecodeError):
            named = None
        if isinstance(named, str) and named.isidentifier() and hasattr(transformers, named):
            loader = getattr(transformers, named)
    tokenizer = (loader or transformers.AutoTokenizer).from_pretrained(pretrain)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"pretrain: {pretrain} has no fast (Rust) tokenizer; encoding needs tokenizer.json")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides tokenization and templates: vocabulary, merges, special tokens, chat template."""
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def encode_settings(config: SFTConfig, tokenizer=None) -> EncodeSettings:
    """How rows are encoded; ``tokenizer`` gives the eos written after plain-text rows (text_key)."""
    data = config.sft_train.data_args
    text_end = (tokenizer.eos_token or "") if tokenizer is not None and config.text_key is not None else ""
    return EncodeSettings(mapping=FieldMapping.from_config(config), sequence_length=config.sequence_length,
                          overlong=data.overlong, on_bad_sample=data.on_bad_sample, loss_on_turns=data.loss_on_turns,
                          train_on_reasoning=data.train_on_reasoning, text_end=text_end)


def splits(config: SFTConfig) -> dict[str, list[str]]:
    """Split name -> its source specs (files, dataset folders, Hub ids; see sft.data.sources)."""
    result = {"train": list(config.sft_train.data_args.file_name)}
    if config.validation.data_args.file_name:
        result["validation"] = list(config.validation.data_args.file_name)
    return result


def cache_key(config: SFTConfig, tokenizer) -> tuple[str, dict]:
    """The key of an encoded dataset: the content of every input, never paths or timestamps alone."""
    settings = encode_settings(config)
    inputs = {
        "encoder_version": ENCODER_VERSION,
        "sources": {split: [source_fingerprint(spec) for spec in specs] for split, specs in splits(config).items()},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_identity(config),
        "mapping": dataclasses.asdict(settings.mapping),
        "sequence_length": settings.sequence_length,
        "overlong": settings.overlong,
        "on_bad_sample": settings.on_bad_sample,
        "loss_on_turns": settings.loss_on_turns,
        "train_on_reasoning": settings.train_on_reasoning,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


def template_identity(config: SFTConfig) -> str:
    """What the labels depend on in the template setting: the name alone for a plain template; with switches
    (chat_template_kwargs) or a Jinja file, JSON of the name, the switches and the file's SHA-256."""
    name, switches = config.template_name(), config.sft_train.data_args.chat_template_kwargs
    if not switches and not is_jinja_file(name):
        return name
    parts = {"name": name, "switches": switches}
    if is_jinja_file(name):
        parts["jinja_sha256"] = file_digest(name)
    return json.dumps(parts, sort_keys=True)


def default_encoded_dir(config: SFTConfig, key: str) -> str:
    return os.path.join(config.output_dir, "encoded", key[:16])


def read_meta(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, META_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def check_encoded_folder(config: SFTConfig, folder: str, tokenizer) -> dict:
    """The encode_meta.json of an ``encoded_path`` folder, checked against this run: the tokenizer, the template,
    sequence_length, the field mapping and the label settings it was encoded with must be this run's.

    A folder from scripts/pack.py carries its source's encode_meta.json and its packing sequence_length.
    Raises ConfigError listing every difference.
    """
    meta = read_meta(folder)
    if meta is None:
        raise ConfigError(f"sft_train.data_args.encoded_path: {folder} has no {META_FILE} (or an unreadable one): "
                          "it was not written by scripts/encode.py or scripts/pack.py, so nothing says how it was encoded")
    recorded = meta.get("inputs", {})
    settings = encode_settings(config)
    ours = {"tokenizer": tokenizer_fingerprint(tokenizer), "template": template_identity(config),
            "sequence_length": settings.sequence_length, "mapping": dataclasses.asdict(settings.mapping),
            "loss_on_turns": settings.loss_on_turns, "train_on_reasoning": settings.train_on_reasoning}
    packed_at = meta.get("packed_sequence_length")
    if packed_at is not None:
        recorded = {**recorded, "sequence_length": packed_at}
    differences = []
    for name, value in ours.items():
        if recorded.get(name) != value:
            if name == "tokenizer":
                differences.append(f"tokenizer: the folder's was another ({meta.get('pretrain')}), this run's is {config.pretrain}")
            elif name == "mapping":
                changed = sorted(key for key in value if recorded.get(name, {}).get(key) != value[key])
                differences.append("field mapping: " + ", ".join(
                    f"{key} {recorded.get(name, {}).get(key)!r} there, {value[key]!r} here" for key in changed))
            else:
                differences.append(f"{name}: {recorded.get(name)!r} there, {value!r} here")
    if differences:
        raise ConfigError(f"sft_train.data_args.encoded_path: {folder} was encoded differently from this run: "
                          + "; ".join(differences) + ". Re-encode with scripts/encode.py (and pack.py), or change the "
                          "run's settings to match")
    return meta


def build_encoded(config: SFTConfig, out_dir: Optional[str] = None, tokenizer=None, log=print) -> tuple[str, dict, bool]:
    """Encode every split of ``config`` into ``out_dir`` (default under output_dir), or reuse a matching cache.

    Returns (folder, meta, reused). Raises EncodeError/DataError naming file and row on bad input.
    """
    tokenizer = tokenizer or load_tokenizer(config.pretrain)
    key, inputs = cache_key(config, tokenizer)
    out_dir = out_dir or default_encoded_dir(config, key)
    meta = read_meta(out_dir)
    if meta is not None and meta.get("cache_key") == key:
        log(f"Reusing encoded data in {out_dir} (inputs unchanged, cache key {key[:16]})")
        return out_dir, meta, True
    if os.path.exists(out_dir) and os.listdir(out_dir) and meta is None:
        raise ConfigError(f"out: {out_dir} exists and is not an encoded dataset; choose another --out")

    template = get_template(config.template_name(), tokenizer, config.sft_train.data_args.chat_template_kwargs)
    settings = encode_settings(config, tokenizer)
    data = config.sft_train.data_args
    reports = {}
    with atomic_dir(out_dir) as staging:  # a killed encoding leaves nothing in out_dir; its staging is removed later
        moves = []  # (rejects file in staging, the configured rejects_file): moved once every split succeeded
        for split, files in splits(config).items():
            rejects_path = os.path.join(staging, f"rejects-{split}.jsonl")
            final_rejects = os.path.join(out_dir, f"rejects-{split}.jsonl")
            if data.rejects_file:
                stem, ext = os.path.splitext(data.rejects_file)
                final_rejects = data.rejects_file if split == "train" else f"{stem}-{split}{ext or '.jsonl'}"
            result = encode_split(files, template, tokenizer, settings, data.preprocessing_num_workers,
                                  desc=f"Encoding {split}", out_dir=os.path.join(staging, split),
                                  rejects_path=rejects_path, work_dir=staging)
            if len(result.dataset) == 0:
                raise DataError(f"{split}: no row of {', '.join(files)} was kept\n{format_report(split, result.report)}")
            if result.rejects_path is not None:
                result.report["rejects_file"] = final_rejects
                if data.rejects_file:
                    moves.append((rejects_path, final_rejects))
            reports[split] = result.report
            del result  # its dataset maps files in staging, renamed below
        for staged, final in moves:
            os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
            shutil.move(staged, final)
        meta = {"cache_key": key, "inputs": inputs, "template": template_identity(config),
                "pretrain": config.pretrain, "reports": reports}
        with open(os.path.join(staging, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
    return out_dir, meta, False


def format_report(split: str, report: dict) -> str:
    """The end-of-encoding report as aligned lines."""
    lines = [f"[{split}] rows read {report['rows_read']:,} | kept {report['kept']:,} | samples {report['samples']:,}"
             f" (split {report['split_samples']:,}) | truncated {report['truncated']:,}"
             f" | re-tokenized at a turn edge {report['retokenized_at_boundary']:,}"]
    for title in ("dropped", "rejected"):
        for reason, count in report[title].items():
            lines.append(f"  {title:<8} {count:>7,}  {reason}")
    if report.get("plain_text_rows"):
        lines.append(f"  plain text {report['plain_text_rows']:>7,}  rows (text_key), every token trained")
    for note, count in report.get("notes", {}).items():
        lines.append(f"  {'note':<8} {count:>7,}  {note}")
    if report["ignored_keys"]:
        lines.append("  ignored keys: " + ", ".join(f"{key} ({count:,} rows)" for key, count in report["ignored_keys"].items()))
    lines.append(f"  tokens {report['total_tokens']:,} | supervised {report['supervised_tokens']:,}"
                 f" ({report['supervised_fraction']:.1%})")
    if report["length_percentiles"]:
        lines.append("  length " + " | ".join(f"{name} {value:,}" for name, value in report["length_percentiles"].items()))
    if report.get("rejects_file"):
        lines.append(f"  rejected rows written to {report['rejects_file']}")
    return "\n".join(lines)
