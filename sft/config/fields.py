"""The field types of a run config that read more than their plain type, and the one parser setting every section
shares. pydantic validates a config (sft/config/loading.py) in its lax mode: '1e-5' becomes a float and 'yes' a
bool there; these types add the readings it does not know, each in one place."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BeforeValidator, ConfigDict

# Every section: an unknown key is an error (not ignored), and a number where text is meant becomes its text
# (YAML reads `exp_name: 7` as an int).
SECTION = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

# What a user may write to mean "no value" for an optional field (the command line cannot give YAML's null).
NONE_WORDS = ("", "none", "null", "None", "~")


def _none_word(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip() in NONE_WORDS else value


def _one_or_more(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def resume_value(value: Any) -> Any:
    """resume_from_checkpoint as "false", "true" or a path (YAML may give a bool, the command line "None")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower()
    if isinstance(value, str) and value.strip() in NONE_WORDS:
        return "false"
    return value


# An optional text field: null, or one of NONE_WORDS, unsets it.
OptionalText = Annotated[Optional[str], BeforeValidator(_none_word)]
# An optional number: null, or one of NONE_WORDS, unsets it.
OptionalNumber = Annotated[Optional[float], BeforeValidator(_none_word)]
# A list of names or paths: one string is a list of one.
Names = Annotated[list[str], BeforeValidator(_one_or_more)]
# false, true or a checkpoint path.
Resume = Annotated[str, BeforeValidator(resume_value)]
