"""What the scripts share at their entry point: a mistake in the user's config or data (any ``UserError``)
ends the script with one line, `error: <what, where>`, and exit status 1, not a traceback. Anything else is
a bug and keeps its traceback. ``run_script`` parses a run config; ``run_tool`` only a script's own options."""

from __future__ import annotations

import sys
from typing import Callable, Optional

from sft.config import load_config
from sft.errors import UserError


def run_script(main: Callable, options: Optional[type] = None) -> None:
    """Parse the command line into a run config whose input paths exist (and the script's own `options`
    dataclass, if any, parsed apart: ``--out``) and run `main` on them."""
    import simple_parsing

    try:
        argv = sys.argv[1:]
        if options is not None:
            parser = simple_parsing.ArgumentParser(add_help=False)
            parser.add_arguments(options, dest="options")
            known, argv = parser.parse_known_args(argv)
        config = load_config(args=argv)
        config.check_paths()
        main(config) if options is None else main(config, known.options)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def run_tool(main: Callable, options: type, argv: Optional[list[str]] = None) -> None:
    """Parse the script's ``options`` dataclass from the command line (no run config) and run ``main`` on it;
    a UserError ends the script with one ``error:`` line and exit status 1, as run_script does."""
    import simple_parsing

    class Parser(simple_parsing.ArgumentParser):
        def error(self, message):  # argparse would print usage and exit 2
            raise UserError(f"{message} (see --help)")

    try:
        parser = Parser(description=sys.modules[main.__module__].__doc__,
                        formatter_class=simple_parsing.SimpleHelpFormatter)
        parser.add_arguments(options, dest="options")
        main(parser.parse_args(sys.argv[1:] if argv is None else argv).options)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
