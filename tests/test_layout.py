"""The package layout's rules (docs/DESIGN.md, "Layout"), checked on the source with `ast`.

The module import graph counts every import statement, including those inside functions
(lazy imports are still dependencies); imports under `if TYPE_CHECKING:` are left out. Rules:
no import cycle; only `dlip.cli` (and `python -m dlip`) imports `dlip.cli` or argparse; a
module imports only from its own layer or below; files stay under 500 lines.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dlip"

# Highest first; a module may import from its own layer or any layer below it.
LAYERS: list[tuple[str, ...]] = [
    ("dlip.cli", "dlip.__main__"),
    ("dlip.demo", "dlip.bench"),
    ("dlip.inference",),
    ("dlip.train",),
    ("dlip.eval",),
    ("dlip.losses", "dlip.data"),
    ("dlip.models",),
    (
        "dlip.config",
        "dlip.config_doc",
        "dlip.progress",
        "dlip.tokenizer",
        "dlip.transforms",
        "dlip.distributed",
        "dlip.fileio",
        "dlip.precision",
        "dlip.images",
        "dlip",
    ),
]
# The command line's groups: `dlip GROUP --help` must not import torch.
CLI_GROUPS = [
    ["info"], ["convert"], ["demo"], ["data", "build", "img2dataset"], ["data", "shard"],
    ["pretrain"], ["finetune"], ["eval", "caption"], ["caption"], ["embed"], ["itm"],
    ["index", "build"], ["search"], ["serve"], ["export", "onnx"], ["bench"], ["completion"],
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules `name` imports (dlip modules resolved to the deepest known module), plus
    'argparse' when it imports argparse."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in ("dlip", "argparse"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] not in ("dlip", "argparse"):
                continue
            for alias in node.names:  # `from dlip.models import io` imports a module
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names `module`'s layer (the package
    `dlip` itself only by its exact name)."""
    best, index = "", -1
    for i, names in enumerate(LAYERS):
        for prefix in names:
            hit = module == prefix or (prefix != "dlip" and module.startswith(prefix + "."))
            if hit and len(prefix) > len(best):
                best, index = prefix, i
    if index < 0:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py::LAYERS")
    return index


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS over dlip modules)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path, state[root] = [root], 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_the_walker_sees_what_it_must():
    """The checks below are only as good as the graph: known edges must be in it."""
    mods = modules()
    g = {n: imports_of(n, p, set(mods)) for n, p in mods.items()}
    assert "dlip.models.blip" in g["dlip.models.io"]
    assert "dlip.cli" in g["dlip.__main__"]
    assert "argparse" in g["dlip.cli"]
    assert "dlip.models.io" in g["dlip.cli"]  # imported inside main(): lazy imports count
    assert layer_of("dlip.cli.train") < layer_of("dlip.train.loop") < layer_of("dlip.models.io")
    assert layer_of("dlip") == layer_of("dlip.fileio") == len(LAYERS) - 1
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_only_the_cli_imports_cli_and_argparse(graph):
    def in_cli(m: str) -> bool:
        return m == "dlip.cli" or m.startswith("dlip.cli.") or m == "dlip.__main__"

    bad = sorted(
        f"{m} imports {t}"
        for m, targets in graph.items()
        if not in_cli(m)
        for t in targets
        if t == "argparse" or in_cli(t)
    )
    assert not bad, "\n".join(bad)


def test_imports_go_down_the_layers(graph):
    bad = sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if t != "argparse" and layer_of(t) < layer_of(m)
    )
    assert not bad, "\n".join(bad)


def _imported_names(path: Path, package: str) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from dlip... import name` in a file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
        elif node.module == "dlip" or (node.module or "").startswith("dlip."):
            target = node.module
        else:
            continue
        out += [(target, a.name, node.lineno) for a in node.names]
    return out


def test_every_imported_name_exists():
    """Lazy imports run only when their function does: a moved or renamed name must still
    resolve, or the command that needs it breaks at run time, not at import time."""
    import importlib

    mods = modules()
    missing = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target, attr, line in _imported_names(path, package):
            module = importlib.import_module(target)
            if not hasattr(module, attr) and f"{target}.{attr}" not in mods:
                missing.append(f"{path.relative_to(SRC.parent)}:{line}: {target}.{attr}")
    assert not missing, "\n".join(missing)


def test_files_stay_under_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k >= 500}


def test_every_group_help_is_torch_free():
    """`dlip GROUP --help` for every command group in one fresh interpreter: each prints its
    usage and exits 0, and none of them imported torch, numpy or PIL."""
    script = f"""
import contextlib, io, json, sys
from dlip.cli import main
usages = {{}}
for command in {CLI_GROUPS!r}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*command, "--help"])
        except SystemExit as e:
            usages[" ".join(command)] = (e.code, out.getvalue().startswith("usage: dlip"))
heavy = sorted(m for m in ("torch", "numpy", "PIL") if m in sys.modules)
print(json.dumps({{"usages": usages, "heavy": heavy}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["usages"] == {" ".join(c): [0, True] for c in CLI_GROUPS}
    assert result["heavy"] == []
