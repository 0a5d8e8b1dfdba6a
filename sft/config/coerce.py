"""Coerce a config's values to their annotated types: YAML and the command line give strings where a number or
a flag is meant ('1e-5', "true"), a one-item list for a list field, a mapping for a nested section."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from sft.errors import ConfigError

# Values a user may write to mean "no value" for an optional string field on the command line, where
# simple-parsing cannot produce None.
_NONE_STRINGS = ("", "none", "null", "None", "~")


def normalise(obj: Any, prefix: str) -> None:
    """Coerce YAML values to the annotated types (YAML leaves '1e-5' a string) and reject wrong ones."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        path = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            if isinstance(value, dict):  # a nested section given as a plain mapping
                try:
                    value = annotation(**value)
                except TypeError as error:
                    raise ConfigError(f"{path}: {error}") from None
                setattr(obj, f.name, value)
            normalise(value, path + ".")
            continue
        setattr(obj, f.name, _coerce(path, value, annotation))


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, members[0]
        origin = typing.get_origin(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: must not be null")
    if optional and annotation is str and isinstance(value, str) and value in _NONE_STRINGS:
        return None
    if path.endswith("resume_from_checkpoint"):
        return value  # bool or str, normalised by normalise_resume
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]  # the command line gives a list of its words
        if isinstance(value, str) and value.strip().startswith("["):  # a YAML list given as one string: "[a, b]"
            value = _yaml_value(path, value)
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ConfigError(f"{path}: expected a path or a list of paths, got {value!r}")
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    return value


def _yaml_value(path: str, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: cannot read {text!r} as a list: {error}") from None


def normalise_resume(value: Any) -> str:
    """resume_from_checkpoint as "false", "true" or a path (YAML may give a bool, the command line "None")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text.lower() in ("true", "false"):
        return text.lower()
    if text.lower() in _NONE_STRINGS:
        return "false"
    return text
