"""The `dlip` command line: entry points, errors, and the quickstart demo on tiny presets."""

from __future__ import annotations

import subprocess
import sys

import pytest

import dlip
from dlip.cli import main


def test_python_m_dlip_help():
    out = subprocess.run(
        [sys.executable, "-m", "dlip", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("info", "convert", "demo"):
        assert command in out


def test_convert_missing_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    code = main(["convert", str(missing), "--from", "salesforce", "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"checkpoint not found: {missing}" in capsys.readouterr().err


def test_convert_hf_dir_without_config(tmp_path, capsys):
    assert main(["convert", str(tmp_path), "--from", "hf", "--out", str(tmp_path / "o")]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_bundled_photos_are_real_images():
    from dlip.demo.measure import PHOTOS, bundled_photo
    from dlip.transforms import load_image

    for name in PHOTOS:
        image = load_image(bundled_photo(name))
        assert min(image.size) >= 200 and image.mode == "RGB"
    assert dlip.__version__


@pytest.mark.parametrize(
    "command", [[], ["serve"], ["eval", "retrieval"], ["finetune"], ["export", "onnx"], ["search"]]
)
def test_help_does_not_import_torch(command):
    """`dlip ... --help` answers without paying for torch (commands import lazily)."""
    code = (
        "import sys\nfrom dlip.cli import main\ntry:\n"
        f"    main({[*command, '--help']!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_overrides_may_follow_options():
    from dlip.cli import parse

    args = parse(["finetune", "retrieval", "--config", "c.yaml", "optim.lr=1e-4", "run.epochs=2"])
    assert args.task == "retrieval" and args.config == "c.yaml"
    assert args.overrides == ["optim.lr=1e-4", "run.epochs=2"]
    args = parse(["finetune", "caption", "a=1", "--config", "c.yaml", "b=2"])
    assert args.overrides == ["a=1", "b=2"]
    with pytest.raises(SystemExit):
        parse(["finetune", "caption", "--config", "c.yaml", "--bogus"])
    with pytest.raises(SystemExit):
        parse(["info", "test_tiny", "x=1"])  # no overrides there
