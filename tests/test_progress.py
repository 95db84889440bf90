"""Progress bars on long work: drawn on a terminal's stderr, absent from logs and pipes and
with `--no-progress`; nothing printed per item either way."""

from __future__ import annotations

import io
import json
import sys
from importlib import resources

import pytest
import torch

import dlip
from dlip.cli import main
from dlip.data.synthetic import synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


class Terminal(io.StringIO):
    """stderr as a terminal would be (tqdm draws on it)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    synthesize(root / "synth", 12, seed=0, image_size=32, n_val=2, n_test=8, captions_per_image=1)
    torch.manual_seed(0)
    dlip.save(dlip.create_model("test_tiny"), root / "model")
    return root


def _run(argv: list[str], monkeypatch, capsys, terminal: bool) -> tuple[str, str]:
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(argv) == 0
    return capsys.readouterr().out, err.getvalue()


def _eval(root, out) -> list[str]:
    return [
        "eval", "retrieval", "--model", str(root / "model"), "--data",
        str(root / "synth/test.json"), "--images", str(root / "synth"), "--out", str(out),
        "--device", "cpu", "--num-workers", "0", "--batch-size", "2", "--itm-batch", "4",
        "--k", "3",
    ]  # fmt: skip


def test_evaluation_shows_bars_on_a_terminal_only(setup, tmp_path, monkeypatch, capsys):
    _, err = _run(_eval(setup, tmp_path / "a"), monkeypatch, capsys, terminal=True)
    for stage in ("image features", "text features", "ITM re-rank"):
        assert stage in err, stage
    assert "it/s" in err or "batch/s" in err
    _, err = _run(_eval(setup, tmp_path / "b"), monkeypatch, capsys, terminal=False)
    assert err == ""  # a log file gets no bar
    _, err = _run([*_eval(setup, tmp_path / "c"), "--no-progress"], monkeypatch, capsys, True)
    assert err == ""
    a, c = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ac")
    assert a["metrics"] == c["metrics"]  # the bar changes nothing else


def test_batch_captions_and_data_builds_show_bars(setup, tmp_path, monkeypatch, capsys):
    photos = resources.files("dlip") / "assets/photos"
    images = [str(photos / n) for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
    argv = ["caption", *images, "--model", str(setup / "model"), "--batch-size", "1"]
    out, err = _run([*argv, "--max-length", "6", "--json"], monkeypatch, capsys, True)
    assert "images:" in err and "/3 [" in err  # a bar over the 3 batches
    assert len(json.loads(out)) == 3  # stdout holds only the answer
    argv = ["data", "build", "karpathy", str(setup / "synth/test.json"), "--images"]
    _, err = _run(
        [*argv, str(setup / "synth"), "--out", str(tmp_path / "k")], monkeypatch, capsys, True
    )
    assert "rows ->" in err
    _, err = _run([*argv, str(setup / "synth"), "--out", str(tmp_path / "k2"), "--no-progress"],
                  monkeypatch, capsys, True)  # fmt: skip
    assert "rows ->" not in err


def test_training_draws_its_bar_on_a_terminal_and_logs_lines_elsewhere(
    setup, tmp_path, monkeypatch, capsys
):
    from dlip.cli.train import pretrain_main
    from dlip.progress import set_enabled
    from dlip.train.logging import Throughput, progress_postfix

    set_enabled(True)  # an earlier `dlip ... --no-progress` in this process turned bars off

    args = [f"run_dir={tmp_path}/run", "model.preset=test_tiny", f"data.synth_dir={setup}/synth",
            "data.batch_size=2", "data.num_workers=0", "loss.momentum_distill=false",
            "max_steps=2", "run.log_every=1"]  # fmt: skip
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert pretrain_main(args) == 0
    out = capsys.readouterr().out
    assert "train:" in err.getvalue() and "step 2 |" not in out  # the bar, not the lines
    log = (tmp_path / "run/train.log").read_text()
    assert "step 1 | loss" in log and "step 2 | loss" in log  # train.log gets them
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: lines, no bar
    assert pretrain_main([*args[1:], f"run_dir={tmp_path}/run2"]) == 0
    assert "step 2 | loss" in capsys.readouterr().out
    skips = progress_postfix(1.5, Throughput(), 3, {"missing_file": 3, "bad_text": 1})
    assert skips["skipped"] == "4 (missing_file 3, bad_text 1)"
