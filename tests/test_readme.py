"""The README's Python example runs as written, and its preset table matches `dlip info`."""

from __future__ import annotations

import re
from pathlib import Path

import dlip
from dlip.models.counting import meta_model, param_counts

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([2, 2]) torch.Size([2, 2]) 2 torch.Size([2, 2, 7, 5])" in out


def test_readme_quickstart_is_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_param_table_is_true():
    rows = re.findall(
        r"^\| `(\w+)` \|.*?\| ([\d.]+)M \| ([\d.]+)M \| ([\d.]+)M \|", README.read_text(), re.M
    )
    assert len(rows) == 5
    for name, retrieval, captioning, total in rows:
        p = param_counts(meta_model(dlip.get_config(name)))
        assert f"{p.retrieval / 1e6:.1f}" == retrieval, name
        assert f"{p.captioning / 1e6:.1f}" == captioning, name
        assert f"{p.total / 1e6:.1f}" == total, name


def test_every_test_that_reliability_md_cites_exists():
    """docs/reliability.md backs each promise with named tests: they must exist (a renamed or
    deleted test would leave a promise held by nothing)."""
    root = README.parent
    doc = (root / "docs" / "reliability.md").read_text()
    cited = set(re.findall(r"`(?:test_\w+\.py::)?(test_\w+)`", doc))
    files = set(re.findall(r"`(test_\w+\.py)", doc))
    assert len(cited) >= 15 and files
    for name in files:
        assert (root / "tests" / name).is_file(), name
    defined = {
        m
        for f in (root / "tests").glob("test_*.py")
        for m in re.findall(r"def (test_\w+)", f.read_text())
    }
    assert cited - defined == set()
