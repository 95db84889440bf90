"""Bad files and options of the inference and evaluation commands are one-line errors naming
the file or option (exit code 2), never tracebacks or NaN results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlip.cli import main
from dlip.data.synthetic import synthesize
from dlip.inference.index import ImageIndex, build_index

pytestmark = pytest.mark.usefixtures("one_thread")


def _error(capsys, argv: list[str]) -> str:
    """The message `dlip ARGV` prints when it fails with exit code 2 (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5", "many"])
def test_serve_refuses_a_meaningless_upload_limit(capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "test_tiny", "--max-upload-mb", value])
    assert exit_.value.code == 2
    assert "--max-upload-mb" in capsys.readouterr().err


def test_index_build_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    out = tmp_path / "index.bin"
    out.write_bytes(b"an unrelated file")
    argv = ["index", "build", str(tmp_path / "images"), "--model", "test_tiny", "--out", str(out)]
    assert f"--out {out}: a file is there" in _error(capsys, argv)
    assert out.read_bytes() == b"an unrelated file"


@pytest.fixture(scope="module")
def built_index(pred, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idx")
    synthesize(root / "images", 12, image_size=32)
    build_index(pred, root / "images", root / "index", progress=False)
    return root / "index"


def _copy(index: Path, to: Path) -> Path:
    to.mkdir()
    for f in index.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("truncate_features", "features.safetensors: not a readable safetensors file"),
        ("garble_json", "index.json: not valid JSON"),
        ("no_paths", "index.json: 'paths' is not a list"),
        ("delete_features", "features.safetensors not found"),
    ],
)
def test_a_corrupt_index_is_named_at_serve_and_search(
    built_index, tmp_path, capsys, damage, needle
):
    index = _copy(built_index, tmp_path / "index")
    features, meta = index / "features.safetensors", index / "index.json"
    if damage == "truncate_features":
        features.write_bytes(features.read_bytes()[:100])
    elif damage == "garble_json":
        meta.write_text('{"paths": [')
    elif damage == "no_paths":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "paths": None}))
    else:
        features.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        ImageIndex.load(index)
    assert needle in _error(capsys, ["search", str(index), "a red circle"])
    assert needle in _error(capsys, ["serve", "--model", "test_tiny", "--index", str(index)])


def test_a_corrupt_model_file_is_named(model_dir, tmp_path, capsys):
    broken = _copy(model_dir, tmp_path / "model")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _error(capsys, ["caption", "--model", str(broken), str(weights)])
    assert f"{weights}: not a readable safetensors file" in err
    weights.write_bytes(b"\x00" * 64)
    err = _error(capsys, ["embed", "--text", "a cat", "--model", str(broken)])
    assert f"{weights}: not a readable safetensors file" in err


@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_eval_on_an_empty_split_is_refused_without_writing_results(
    model_dir, tmp_path, capsys, task
):
    (tmp_path / "test.json").write_text("[]")
    out = tmp_path / "out"
    argv = ["eval", task, "--model", str(model_dir), "--data", str(tmp_path / "test.json")]
    err = _error(capsys, [*argv, "--images", str(tmp_path), "--out", str(out)])
    assert "test.json: no images to evaluate" in err
    assert not (out / "results.json").exists()
