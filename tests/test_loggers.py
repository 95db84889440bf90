"""`run.report_to`: metrics.jsonl always, tensorboard and wandb (offline: a local run directory)
on request; validation metrics and sample captions reach every logger; the console is copied to
run_dir/train.log without progress-bar redraws; a logger that does not import fails first."""

from __future__ import annotations

import json
import sys

import pytest

from dlip.cli.train import finetune_main
from dlip.config import ConfigError
from dlip.data.synthetic import synthesize
from dlip.train.config import FinetuneConfig, load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_log")
    synthesize(out, 16, seed=0, image_size=32, captions_per_image=2, n_val=4, n_test=4)
    return out


def _args(synth, run_dir, report_to: str) -> list[str]:
    items = {
        "run_dir": run_dir, "model.preset": "test_tiny", "data.synth_dir": synth,
        "data.batch_size": 4, "data.num_workers": 0, "loss.momentum_distill": "false",
        "run.max_steps": 3, "run.log_every": 1, "eval.batch_size": 8, "eval.max_length": 8,
        "run.report_to": report_to, "run.wandb_project": "dlip-test",
    }  # fmt: skip
    return ["caption", *[f"{k}={v}" for k, v in items.items()]]


def test_every_logger_gets_metrics_and_sample_captions(synth, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    assert finetune_main(_args(synth, run_dir, "[jsonl,tensorboard,wandb]")) == 0

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    (val,) = [r for r in rows if "val_CIDEr" in r]
    assert len(val["val_samples"]) == 3
    assert set(val["val_samples"][0]) == {"image", "caption", "reference"}

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "val_CIDEr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert any("val_samples" in t for t in tags["tensors"])

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")  # what `wandb sync` uploads
    history = _wandb_history(records)
    assert [h["_step"] for h in history if "loss" in h] == [1, 2, 3]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert all(h["loss"] == pytest.approx(train[h["_step"]]) for h in history if "loss" in h)
    (wval,) = [h for h in history if "val_CIDEr" in h]
    assert wval["val_CIDEr"] == pytest.approx(val["val_CIDEr"])
    assert (wval["val_samples/_type"], wval["val_samples/nrows"]) == ("table-file", 3)
    table = json.loads((offline / "files" / wval["val_samples/path"]).read_text())
    assert table["columns"] == ["image", "caption", "reference"]
    assert [r[1] for r in table["data"]] == [s["caption"] for s in val["val_samples"]]

    log = (run_dir / "train.log").read_text()
    assert "\r" not in log  # no progress-bar redraws
    assert "step 3 | loss" in log and "val_CIDEr" in log
    first = val["val_samples"][0]
    assert f"{first['image']}: {first['caption']!r}" in log
    assert "over the run (by reason)" in log  # the run's own prints are copied too


def test_missing_logger_package_fails_before_training(synth, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"run\.report_to lists wandb, which does not import"):
        finetune_main(_args(synth, run_dir, "[jsonl,wandb]"))
    assert not run_dir.exists()


def test_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match=r"run\.report_to"):
        load(None, ["task=caption", "run.report_to=[jsonl,wnadb]"], cls=FinetuneConfig)


def _wandb_history(path) -> list[dict]:
    """The history rows of an offline .wandb file: a 7-byte header (":W&B", magic, version),
    then LevelDB-log records (crc 4, length 2, type 1 + data) in 32 KiB blocks, each data a
    wandb Record protobuf; chunked records (types 2-4) are joined."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole Record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows
