"""What the scripts share at their entry point: a mistake in the user's config or data (any ``UserError``)
ends the script with one line, `error: <what, where>`, and exit status 1, not a traceback. Anything else is
a bug and keeps its traceback."""

from __future__ import annotations

import sys
from typing import Callable, Optional

from sft.config import load_config
from sft.errors import UserError


def run_script(main: Callable, options: Optional[type] = None) -> None:
    """Parse the command line (with the script's own `options` dataclass, if any) and run `main` on it."""
    try:
        if options is None:
            main(load_config())
        else:
            main(*load_config(extra=options))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
