"""Read a run config: ``--config_path FILE.yaml`` plus dotted command-line overrides, parsed by simple-parsing."""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

from sft.config.run import SFTConfig
from sft.errors import ConfigError


def load_config(config_path: Optional[str] = None, args: Optional[list[str]] = None, check_paths: bool = True,
                extra: Optional[type] = None) -> SFTConfig:
    """Parse ``--config_path FILE.yaml`` plus dotted overrides into an SFTConfig and validate it.

    ``extra`` is an optional dataclass of script-specific options (e.g. encode.py's ``--out``),
    parsed from the same command line and returned as ``(config, extra)``.
    """
    import simple_parsing
    import yaml
    from simple_parsing import ArgumentGenerationMode, NestedMode

    argv = sys.argv[1:] if args is None else list(args)
    if config_path is not None:
        argv = ["--config_path", config_path, *argv]
    extra_values = None
    if extra is not None:
        # Script options are parsed apart: simple-parsing would otherwise look for them in the YAML too.
        extra_parser = simple_parsing.ArgumentParser(add_help=False)
        extra_parser.add_arguments(extra, dest="extra")
        known, argv = extra_parser.parse_known_args(argv)
        extra_values = known.extra
    class Parser(simple_parsing.ArgumentParser):
        def error(self, message):  # argparse would print usage and exit; name the field in a ConfigError
            raise ConfigError(message.replace("argument --", "").replace("/--sft_train.no", " / no"))

    parser = Parser(
        argument_generation_mode=ArgumentGenerationMode.NESTED,
        nested_mode=NestedMode.WITHOUT_ROOT,
        add_config_path_arg=True,
        description="Supervised fine-tuning run config (YAML via --config_path, overridden by dotted flags).",
    )
    parser.add_arguments(SFTConfig, dest="config")
    path = _config_file(argv)
    if path is not None:  # simple-parsing would end in a bare FileNotFoundError or a YAML parser traceback
        if not os.path.isfile(path):
            raise ConfigError(f"config_path: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as handle:
                yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"config_path: {path} is not valid YAML: {error}") from None
    try:
        namespace = parser.parse_args(argv)
    except RuntimeError as error:  # simple-parsing reports unknown YAML keys this way
        match = re.search(r"\[(.*)\] are not fields of <class '[\w.]+\.(\w+)'> at path '([\w.]+)'", str(error))
        if match:
            section = match[3].removeprefix("config").lstrip(".")
            where = f"section '{section}'" if section else "the top level"
            raise ConfigError(
                f"unknown config key(s) {match[1]} at {where} of {path} ({match[2]} has no such field)"
            ) from None
        raise ConfigError(str(error)) from None
    config = namespace.config
    if check_paths:
        config.check_paths()
    if extra is not None:
        return config, extra_values
    return config


def _config_file(argv: list[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == "--config_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config_path="):
            return arg.split("=", 1)[1]
    return None
