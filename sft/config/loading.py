"""Read a run config: ``--config_path FILE.yaml`` plus command-line overrides, one per field by its dotted path.

    python scripts/train.py --config_path configs/demo.yaml --sft_train.training_args.max_steps 20 --seed 1

The YAML is read once. Each override replaces one field (``--save_steps 2`` for a top-level field); a list field
takes words or one YAML list (``--sft_train.model_args.lora_target q_proj v_proj`` or ``'[q_proj, v_proj]'``), a
mapping field one YAML mapping (``--tracker_kwargs '{log_dir: runs/a}'``). pydantic then types and validates the
whole mapping against the sections' dataclasses (unknown keys and wrong types are its errors, read from their
structured form), and the sections' own checks run. Every mistake is one ConfigError naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from typing import Any, Optional

from sft.config.run import SFTConfig
from sft.errors import ConfigError


def load_config(config_path: Optional[str] = None, args: Optional[list[str]] = None) -> SFTConfig:
    """The run config of ``--config_path FILE.yaml`` (or ``config_path``) with the overrides in ``args``
    (default: the command line), validated. Input paths are checked by ``SFTConfig.check_paths``, apart."""
    argv = sys.argv[1:] if args is None else list(args)
    if config_path is not None:
        argv = ["--config_path", config_path, *argv]
    parsed = vars(_parser().parse_args(argv))
    path = parsed.pop("config_path")
    values = _read_yaml(path) if path is not None else {}
    for name, words in parsed.items():
        if words is not None:
            _override(values, name, _command_line_value(name, words))
    config = _validate(values, path)
    config.check()
    return config


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One leaf field of the run config: its dotted path, its type's kind and its docstring."""

    path: str
    kind: str  # "list", "mapping", "flag" or "scalar"
    default: Any
    doc: str


@functools.cache
def config_fields() -> dict[str, ConfigField]:
    """Every leaf field of SFTConfig by dotted path, in declaration order."""
    return dict((f.path, f) for f in _walk(SFTConfig, ""))


def _walk(cls: type, prefix: str):
    from simple_parsing.docstring import get_attribute_docstring

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = _plain(hints[f.name])
        if dataclasses.is_dataclass(annotation):
            yield from _walk(annotation, f"{prefix}{f.name}.")
            continue
        origin = typing.get_origin(annotation)
        kind = ("list" if origin is list else "mapping" if annotation is dict or origin is dict
                else "flag" if annotation is bool else "scalar")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        yield ConfigField(prefix + f.name, kind, default, get_attribute_docstring(cls, f.name).docstring_below)


def _plain(annotation: Any) -> Any:
    """The type under Annotated[...] and Optional[...]."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit 2; name the flag in a ConfigError instead
        unknown = message.split("unrecognized arguments: ", 1)[-1].split()
        flags = [word for word in unknown if word.startswith("--")] if "unrecognized" in message else []
        if flags:
            name = flags[0].split("=", 1)[0].removeprefix("--")
            close = difflib.get_close_matches(name, config_fields(), n=1, cutoff=0.6)
            hint = f" (did you mean --{close[0]}?)" if close else " (see --help)"
            raise ConfigError(f"{flags[0]}: no such config field{hint}")
        raise ConfigError(message.replace("argument --", ""))


@functools.cache
def _parser() -> argparse.ArgumentParser:
    parser = _Parser(description="Supervised fine-tuning run config (YAML via --config_path, overridden by flags "
                                 "named by a field's dotted path).", allow_abbrev=False)
    parser.add_argument("--config_path", help="The run's YAML config.")
    for f in config_fields().values():
        shape = {"list": {"nargs": "+"}, "flag": {"nargs": "?", "const": "true"}}.get(f.kind, {})
        parser.add_argument(f"--{f.path}", dest=f.path, metavar=f.kind.upper() if f.kind != "scalar" else "VALUE",
                            help=f"{f.doc} (default: {f.default!r})", **shape)
    return parser


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config_path: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ConfigError(f"config_path: {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config_path: {path} must hold a mapping of config fields, not a {type(values).__name__}")
    return values


def _command_line_value(name: str, words: Any) -> Any:
    """A flag's words as the field's value: a list field takes words or one YAML list, a mapping field one YAML
    mapping; any other value stays text for pydantic to type (it reads '2e-5' as a float, 'yes' as a bool)."""
    kind = config_fields()[name].kind
    if kind == "list":
        if len(words) == 1 and words[0].strip().startswith("["):
            return _yaml_text(name, words[0])
        return list(words)
    if kind == "mapping":
        value = _yaml_text(name, words)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping like '{{key: value}}', got {words!r}")
        return value
    return words


def _yaml_text(name: str, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{name}: cannot read {text!r} as YAML: {error}") from None


def _override(values: dict, name: str, value: Any) -> None:
    node, *parents, leaf = [values, *name.split(".")]
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: expected a mapping of its fields, got {child!r}")
        node = child
    node[leaf] = value


@functools.cache
def _adapter():
    from pydantic import TypeAdapter

    return TypeAdapter(SFTConfig)


def _validate(values: dict, path: Optional[str]) -> SFTConfig:
    from pydantic import ValidationError

    try:
        return _adapter().validate_python(values)
    except ValidationError as error:
        problems = [_describe(problem, path) for problem in error.errors(include_url=False)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more) from None


def _describe(problem: dict, path: Optional[str]) -> str:
    """One pydantic error as `<dotted field>: <what is wrong>`."""
    keys = [str(key) for key in problem["loc"] if not isinstance(key, int)]
    name = ".".join(keys)
    if problem["type"] == "unexpected_keyword_argument":
        section = ".".join(keys[:-1])
        known = [f.path.removeprefix(section + ".") if section else f.path for f in config_fields().values()
                 if f.path.startswith(section + ".") or not section]
        fields = sorted({entry.split(".")[0] for entry in known})
        close = difflib.get_close_matches(keys[-1], fields, n=1, cutoff=0.6)
        where = f"section '{section}'" if section else "the top level"
        origin = f" of {path}" if path else ""
        hint = f"; did you mean {close[0]}?" if close else f"; its fields: {', '.join(fields)}"
        return f"{name}: unknown config key at {where}{origin}{hint}"
    if problem["type"] == "dataclass_type":
        return f"{name}: expected a mapping of its fields, got {problem['input']!r}"
    message = problem["msg"][0].lower() + problem["msg"][1:]
    return f"{name}: {message}, got {problem['input']!r}"
