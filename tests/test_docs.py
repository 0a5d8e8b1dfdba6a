"""The docs name only what exists: README.md and every docs/*.md page, checked against the code.

1. Config fields. Every key path of a fenced ``yaml`` block is a field of the config dataclasses (walked from
   ``SFTConfig`` with ``dataclasses.fields``; keys under a mapping field such as ``strategy_config`` are that
   strategy option table's keys), and every dotted flag (``--sft_train.training_args.max_steps``) is a field path.
   The parser takes nested fields by their full path and top-level fields by their name (``--save_steps``); it does
   not take a nested field's last component alone (``--max_steps`` is an error), so neither does this check.
2. Commands. ``python X.py``, ``accelerate launch ... X.py``, ``bash X.sh``, ``sbatch ... X.sbatch`` name files
   that exist, and every ``--flag`` after the script is a config flag (for the scripts that read a run config or
   pass their arguments on to scripts/train.py) or an option the script defines (read from its source: argparse
   ``add_argument`` strings, the fields of the options dataclass it hands to ``run_tool``/``run_script``, the
   flags a shell script's text names). A flag in prose, outside a command, must exist somewhere: a config flag, or
   an option of a script or launcher of this repository.
3. Paths and links. Repository paths written in the docs (``sft/train/loss.py``, ``configs/demo.yaml``, a test
   file's name) exist, and every relative link points to an existing file, and to an existing heading when it
   names an anchor.

Every problem is reported as ``file:line: what``. Pure reading: no script is run (about a second).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import re
import shlex
import types
import typing

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT_DIRS = ("scripts", "bench", "launch")
REPO_DIRS = ("sft", "scripts", "bench", "launch", "configs", "tests", "docs")
ALWAYS = {"--help", "-h"}  # every script takes these
FLAG = re.compile(r"^--[A-Za-z][\w.-]*$")
SCRIPT = re.compile(r"^[\w./-]+\.(?:py|sh|sbatch)$")


# ----- the config's fields ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def config_tree() -> dict:
    """Nested dict of the config's fields: a section maps to its own dict, a leaf to None, a mapping field to
    the set of keys it may hold (None: any key)."""
    from sft.config import SFTConfig
    from sft.config.strategy_options import OPTIONS

    strategy_keys = frozenset(key for keys in OPTIONS.values() for key in keys)
    open_keys = {"sft_train.strategy_args.strategy_config": strategy_keys}

    def walk(cls, prefix: str) -> dict:
        hints = typing.get_type_hints(cls)
        tree = {}
        for field in dataclasses.fields(cls):
            kind = _plain(hints[field.name])
            path = f"{prefix}{field.name}"
            if dataclasses.is_dataclass(kind):
                tree[field.name] = walk(kind, path + ".")
            elif kind is dict or typing.get_origin(kind) is dict:
                tree[field.name] = open_keys.get(path, frozenset({"*"}))
            else:
                tree[field.name] = None
        return tree

    return walk(SFTConfig, "")


def _plain(kind):
    """The type under Annotated[...] and Optional[...]."""
    if typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


@functools.lru_cache(maxsize=None)
def config_flags() -> frozenset:
    """``--save_steps`` for a top-level field, ``--sft_train.training_args.max_steps`` for a nested one."""
    flags = {"--config_path"}

    def walk(tree: dict, prefix: str) -> None:
        for name, sub in tree.items():
            if isinstance(sub, dict):
                walk(sub, f"{prefix}{name}.")
            else:
                flags.add(f"--{prefix}{name}")

    walk(config_tree(), "")
    return frozenset(flags)


# ----- what each script takes -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def script_options(relative: str) -> tuple[frozenset, bool]:
    """(the options the script defines, whether it takes config flags) for a script path under the repo."""
    path = ROOT / relative
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return _python_options(text)
    return _shell_options(relative, text)


def _python_options(text: str) -> tuple[frozenset, bool]:
    tree = ast.parse(text)
    options, option_classes, takes_config = set(), set(), False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "add_argument":
            options |= {arg.value for arg in node.args
                        if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")}
            if any(isinstance(k.value, ast.Attribute) and k.value.attr == "REMAINDER" for k in node.keywords):
                takes_config = True  # the rest of the command line goes on to scripts/train.py
        elif name in ("run_tool", "run_script"):
            takes_config |= name == "run_script"
            option_classes |= {arg.id for arg in [*node.args, *(k.value for k in node.keywords)]
                               if isinstance(arg, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in option_classes:
            options |= {f"--{item.target.id}" for item in node.body
                        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    return frozenset(options | ALWAYS), takes_config


def _shell_options(relative: str, text: str) -> tuple[frozenset, bool]:
    options = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text))
    takes_config = "scripts/train.py" in text and re.search(r'"\$(?:@|\{@)', text) is not None
    for called in set(re.findall(r"(?:launch|bench|scripts)/[\w./-]+\.(?:sh|py)", text)) - {relative}:
        if (ROOT / called).is_file() and called != "scripts/train.py":
            options |= script_options(called)[0]
    return frozenset(options | ALWAYS), takes_config


@functools.lru_cache(maxsize=None)
def known_anywhere() -> frozenset:
    """Every flag some script, launcher or the config takes: what a flag in prose may be."""
    flags = set(config_flags()) | ALWAYS
    for folder in SCRIPT_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", ".sbatch"):
                flags |= script_options(path.relative_to(ROOT).as_posix())[0]
    return frozenset(flags)


# ----- reading a page ---------------------------------------------------------------------------------------

def blocks(text: str):
    """Yield (kind, language, first line number, text) for the page: fenced blocks and prose units. A prose unit
    is one line, joined with the next ones while a code span is open (an odd count of backticks)."""
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            start, body = index + 1, []
            index += 1
            while index < len(lines) and not re.match(r"^\s*```", lines[index]):
                body.append(lines[index])
                index += 1
            yield "fence", fence[1], start + 1, "\n".join(body)
            index += 1
            continue
        start, unit = index, line
        while unit.count("`") % 2 and index + 1 < len(lines) and not lines[index + 1].lstrip().startswith("```"):
            index += 1
            unit += " " + lines[index]
        yield "prose", "", start + 1, unit
        index += 1


def code_spans(unit: str) -> list[str]:
    return re.findall(r"`([^`]+)`", unit)


def command_units(kind: str, language: str, text: str, first: int):
    """(line number, command text) for each shell command the block or prose unit holds."""
    if kind == "prose":
        for span in code_spans(text):
            yield first, span
        return
    if language not in ("", "bash", "sh", "shell", "console"):
        return
    line_no, pending = first, None
    for offset, line in enumerate(text.split("\n")):
        line = re.sub(r"(^|\s)#(\s.*)?$", "", line).rstrip()
        if pending is None:
            line_no, pending = first + offset, line
        else:
            pending += " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        yield line_no, pending
        pending = None
    if pending:
        yield line_no, pending


def split_command(text: str) -> list[list[str]]:
    """The simple commands of a command line (split at &&, ||, ;, |), as tokens."""
    try:
        tokens = shlex.split(text, posix=True)
    except ValueError:
        tokens = text.split()
    commands, current = [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def clean(token: str) -> str:
    return token.strip("[]()<>,").split("=", 1)[0]


def command_script(tokens: list[str]) -> tuple[int, str] | None:
    """(index of the script token, the script) when the tokens run a script of this repo through python, bash,
    sbatch or accelerate launch."""
    for position, token in enumerate(tokens):
        if token in ("python", "python3", "bash", "sbatch") or (
                token == "launch" and position and tokens[position - 1] == "accelerate"):
            rest = tokens[position + 1:]
            if token.startswith("python") and rest and rest[0] == "-m":
                return None
            for offset, candidate in enumerate(rest):
                candidate = clean(candidate)
                if SCRIPT.match(candidate):
                    return position + 1 + offset, candidate
                if token.startswith("python") or token == "bash":
                    if not candidate.startswith("-"):
                        return None  # `python -c`, `bash -c`, a heredoc: not a script of ours
            return None
    return None


# ----- the checks -------------------------------------------------------------------------------------------

def yaml_problems(where: str, first: int, text: str) -> list[str]:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as error:
        return [f"{where}:{first}: the yaml block does not parse: {error}"]
    problems = []

    def walk(node, tree, path: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            name = key.value
            line = first + key.start_mark.line
            full = f"{path}{name}"
            if isinstance(tree, (set, frozenset)):
                if "*" not in tree and name not in tree:
                    allowed = ", ".join(sorted(tree))
                    problems.append(f"{where}:{line}: `{full}` is not a key it takes (allowed: {allowed})")
                continue
            if name not in tree:
                problems.append(f"{where}:{line}: `{full}` is not a config field")
                continue
            if tree[name] is not None:
                walk(value, tree[name], full + ".")

    walk(root, config_tree(), "")
    return problems


def command_problems(where: str, line: int, command: str) -> list[str]:
    problems = []
    for tokens in split_command(command):
        found = command_script(tokens)
        if found is None:
            continue
        position, script = found
        if script.startswith("../"):
            continue  # outside the repository (../shared/tools)
        if not (ROOT / script).is_file():
            problems.append(f"{where}:{line}: `{script}` does not exist")
            continue
        options, takes_config = script_options(script)
        for token in tokens[position + 1:]:
            flag = clean(token)
            if not FLAG.match(flag):
                continue
            if flag in options or (takes_config and flag in config_flags()):
                continue
            if takes_config:
                problems.append(f"{where}:{line}: `{flag}` after {script} is neither a config field nor an option "
                                "of it")
            else:
                problems.append(f"{where}:{line}: `{flag}` after {script} is not an option of it")
    return problems


def prose_flag_problems(where: str, line: int, unit: str) -> list[str]:
    problems = []
    for span in code_spans(unit):
        for tokens in split_command(span):
            if command_script(tokens) is not None:
                continue  # checked as a command
            for token in tokens:
                flag = clean(token)
                if not FLAG.match(flag):
                    continue
                if "." in flag and flag not in config_flags():
                    problems.append(f"{where}:{line}: `{flag}` is not a config field")
                elif "." not in flag and flag not in known_anywhere():
                    problems.append(f"{where}:{line}: `{flag}` is not a flag of the config or of any script")
    return problems


REPO_PATH = re.compile(r"(?<![\w./<>$-])((?:%s)/[\w./*<>{}-]*)" % "|".join(REPO_DIRS))
TEST_FILE = re.compile(r"(?<![\w/])(test_\w+\.py)\b")


def path_problems(where: str, line: int, text: str) -> list[str]:
    problems = []
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".,:;")
        if any(char in path for char in "*<>{}"):
            continue  # a pattern or a placeholder
        if not (ROOT / path).exists():
            problems.append(f"{where}:{line}: `{path}` does not exist")
    for name in TEST_FILE.findall(text):
        if not (ROOT / "tests" / name).is_file():
            problems.append(f"{where}:{line}: `tests/{name}` does not exist")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ removed, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    found, seen = set(), {}
    for kind, _, _, unit in blocks(path.read_text(encoding="utf-8")):
        heading = re.match(r"^#{1,6}\s+(.*)$", unit) if kind == "prose" else None
        if heading:
            base = slug(heading[1])
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def link_problems(where: str, page: pathlib.Path, line: int, unit: str) -> list[str]:
    problems = []
    prose = re.sub(r"`[^`]*`", "", unit)
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            problems.append(f"{where}:{line}: link `{target}`: {file_part} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{where}:{line}: link `{target}`: {linked.name} has no heading #{anchor}")
    return problems


def page_problems(page: pathlib.Path, text: str | None = None) -> list[str]:
    text = page.read_text(encoding="utf-8") if text is None else text
    try:
        where = page.relative_to(ROOT).as_posix()
    except ValueError:
        where = page.name
    problems = []
    for kind, language, first, body in blocks(text):
        if kind == "fence" and language in ("yaml", "yml"):
            problems += yaml_problems(where, first, body)
            continue
        for line, command in command_units(kind, language, body, first):
            problems += command_problems(where, line, command)
        if kind == "prose":
            problems += prose_flag_problems(where, first, body)
            problems += link_problems(where, page, first, body)
            problems += path_problems(where, first, body)
        elif language != "yaml":
            for offset, line_text in enumerate(body.split("\n")):
                problems += path_problems(where, first + offset, line_text)
    return sorted(set(problems), key=problems.index)


# ----- the tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_the_page_names_only_what_exists(page):
    problems = page_problems(page)
    assert not problems, "the docs name what does not exist:\n" + "\n".join(problems)


def test_the_docs_pages_exist():
    names = {page.name for page in PAGES}
    assert {"README.md", "data.md", "training.md", "launching.md", "architecture.md", "guarantees.md"} <= names


def test_the_command_line_takes_flags_as_derived_here(monkeypatch):
    """The rule config_flags() follows is the loader's: a top-level field by its name, a nested one by its full
    dotted path, and not by its last component alone."""
    from sft.config import load_config
    from sft.errors import ConfigError

    monkeypatch.chdir(ROOT)
    config = load_config("configs/demo.yaml", ["--save_steps", "3", "--sft_train.training_args.max_steps", "7"])
    assert (config.save_steps, config.sft_train.training_args.max_steps) == (3, 7)
    assert {"--save_steps", "--sft_train.training_args.max_steps"} <= config_flags()
    with pytest.raises(ConfigError):
        load_config("configs/demo.yaml", ["--max_steps", "7"])
    assert "--max_steps" not in config_flags()


def test_the_check_catches_what_does_not_exist(tmp_path):
    page = tmp_path / "bad.md"
    text = "\n".join([
        "# Bad",
        "```yaml",
        "sft_train:",
        "  training_args:",
        "    max_stepz: 3",
        "  strategy_args:",
        "    strategy_config: {zero_stage: 3, zero_stages: 2}",
        "```",
        "Run `python scripts/train.py --config_path configs/demo.yaml --sft_train.training_args.max_stepz 3`.",
        "```bash",
        "python scripts/trian.py --config_path configs/demo.yaml",
        "python scripts/chat.py --model out --promptt hi",
        "accelerate launch scripts/train.py --config_path configs/nope.yaml \\",
        "    --max_steps 3",
        "```",
        "Set `--sft_train.data_args.templat chatml`; [data](nope.md), [templates](#nowhere), `sft/train/gone.py`.",
    ])
    problems = page_problems(page, text)
    expected = [
        "bad.md:5: `sft_train.training_args.max_stepz` is not a config field",
        "bad.md:7: `sft_train.strategy_args.strategy_config.zero_stages` is not a key it takes",
        "bad.md:9: `--sft_train.training_args.max_stepz` after scripts/train.py",
        "bad.md:11: `scripts/trian.py` does not exist",
        "bad.md:12: `--promptt` after scripts/chat.py is not an option of it",
        "bad.md:13: `configs/nope.yaml` does not exist",
        "bad.md:13: `--max_steps` after scripts/train.py",
        "bad.md:16: `--sft_train.data_args.templat` is not a config field",
        "bad.md:16: link `nope.md`",
        "bad.md:16: link `#nowhere`",
        "bad.md:16: `sft/train/gone.py` does not exist",
    ]
    for start in expected:
        assert any(problem.startswith(start) for problem in problems), (start, problems)
    assert len(problems) == len(expected), problems
