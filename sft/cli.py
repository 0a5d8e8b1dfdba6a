"""What the scripts share at their entry point: a mistake in the user's config or data ends the script with
one line, `error: <what, where>`, and exit status 1, not a traceback. Anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import sys
from typing import Callable, Optional

from sft.config import ConfigError, load_config
from sft.data import DataError
from sft.encoding import EncodeError
from sft.packing import PackingError
from sft.templates import TemplateError

USER_ERRORS = (ConfigError, DataError, EncodeError, TemplateError, PackingError)


def run_script(main: Callable, options: Optional[type] = None) -> None:
    """Parse the command line (with the script's own `options` dataclass, if any) and run `main` on it."""
    try:
        if options is None:
            main(load_config())
        else:
            main(*load_config(extra=options))
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
