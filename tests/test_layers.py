"""The package's layers point one way: config -> data -> train -> export (imports inside functions count).

The shared modules at the top of sft/ (errors, files, staging, runlock, generation, cli) sit beside the layers: each layer
may use them, and they use nothing of a layer but config (cli parses the command line into a config)."""
import ast
import pathlib

SFT = pathlib.Path(__file__).resolve().parents[1] / "sft"
ORDER = ["config", "data", "train", "export"]   # each may import those before it, never those after
SHARED = {"errors": set(), "files": set(), "staging": set(), "runlock": {"errors", "files"}, "generation": set(),
          "cli": {"config", "errors"}}


def layer_of(module: str) -> str:
    """``sft.data.sources.json`` -> ``data``; ``sft.errors`` -> ``errors``."""
    return module.split(".")[1]


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sft"):
            if node.module == "sft":
                found |= {f"sft.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sft.")}
    return found


def test_every_module_sits_in_a_layer_or_the_shared_set():
    for path in SFT.rglob("*.py"):
        top = path.relative_to(SFT).parts[0].removesuffix(".py")
        assert top in ORDER or top in SHARED or top == "__init__", f"{path}: not in a layer or the shared set"


def test_imports_point_one_way():
    wrong = []
    for path in SFT.rglob("*.py"):
        rel = path.relative_to(SFT)
        here = rel.parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for module in imports_of(path):
            there = layer_of(module)
            if there == here:
                continue
            if here in SHARED:
                allowed = SHARED[here]
            else:
                allowed = set(SHARED) | set(ORDER[:ORDER.index(here)])
            if there not in allowed:
                wrong.append(f"sft/{rel} ({here}) imports {module} ({there})")
    assert not wrong, "\n".join(wrong)
