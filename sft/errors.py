"""The one base class of user mistakes, and the label value that marks a token as not trained on.

Every error a user can fix (a config field, a data file, a row, a template, a resume that does not fit)
derives from ``UserError``; the scripts' entry point (sft/cli.py) prints it as one ``error:`` line and exits
1. Anything else is a bug and keeps its traceback.
"""

IGNORE_INDEX = -100  # labels[i] == IGNORE_INDEX: token i is context, not a target (PyTorch's cross-entropy default)


class UserError(ValueError):
    """A mistake in the user's config, data or command line; the message says what and where."""


class ConfigError(UserError):
    """A config value is invalid; the message names the field."""


class DataError(UserError):
    """A whole input file is unusable (unreadable, malformed JSON, a key no row has)."""
