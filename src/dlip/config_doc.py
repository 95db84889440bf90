"""A config as commented YAML: every key with its value, type, default and the comment its
dataclass field carries in the source (`dlip pretrain|finetune --print-config`).

The comment of a field is the `# ...` on its line, else the comment lines right above it; a
section's is its class docstring's first line. The YAML loads back to the same config, so the
printed file runs as given (`dlip pretrain --config printed.yaml`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any

import yaml

from dlip.config import describe, to_plain


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass, read from its source."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not text.startswith("fmt:") and not text.startswith("noqa"):
                comments[tok.start[0]] = text
    source_lines, out = source.splitlines(), {}
    (node,) = ast.parse(source).body
    for item in node.body:  # type: ignore[attr-defined]
        if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
            continue
        lines = range(item.lineno, (item.end_lineno or item.lineno) + 1)
        text = " ".join(comments[n] for n in lines if n in comments)
        if not text:
            above, n = [], item.lineno - 1
            while n in comments and not source_lines[n - 1].split("#")[0].strip():  # comment-only
                above.insert(0, comments[n])
                n -= 1
            text = " ".join(above)
        out[item.target.id] = text
    return out


def _flow(value: Any) -> str:
    """One value as inline YAML (flow style), e.g. `1.0e-04`, `null`, `[a, b]`, `{k: 1}`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False)
    return text.replace("\n...\n", "").strip()


def _section_doc(cls: type) -> str:
    return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def annotated_yaml(config: Any, header: str = "") -> str:
    """`config` (a config dataclass) as YAML with a comment per key: type, default, meaning."""
    lines = [f"# {line}" for line in header.splitlines()]
    _emit(type(config), to_plain(config), to_plain(type(config)()), 0, lines)
    return "\n".join(lines) + "\n"


def _emit(cls: type, values: dict, defaults: dict, depth: int, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    notes = field_comments(cls)
    pad = "  " * depth
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], values[f.name]
        if dataclasses.is_dataclass(tp):
            doc = notes.get(f.name) or _section_doc(tp)  # type: ignore[arg-type]
            lines.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            _emit(tp, value, defaults[f.name], depth + 1, lines)  # type: ignore[arg-type]
            continue
        default = defaults[f.name]
        note = f"{describe(tp)}; default {_flow(default)}"
        if notes.get(f.name):
            note += f"; {notes[f.name]}"
        lines.append(f"{pad}{f.name}: {_flow(value)}  # {note}")
