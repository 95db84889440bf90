"""Settings that mean nothing are refused before step 1, naming the key: non-finite floats
(yaml `.inf` / `.nan`) and a reused `data.synth_dir` that holds another synthetic set."""

from __future__ import annotations

import json
import re

import pytest

from dlip.cli.train import finetune_main, pretrain_main
from dlip.config import ConfigError
from dlip.data.synthdir import synthesize_once
from dlip.data.synthetic import SETTINGS_FILE, synthesize


@pytest.mark.parametrize("key", ["optim.lr", "optim.warmup_lr", "optim.weight_decay", "optim.eps"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused_naming_the_key(tmp_path, key, value):
    base = ["model.preset=test_tiny", f"run.run_dir={tmp_path / 'run'}", "run.device=cpu"]
    with pytest.raises(ConfigError, match=rf"{key}=-?(inf|nan) is not a finite number"):
        pretrain_main([*base, f"data.synth_dir={tmp_path / 's'}", f"{key}={value}"])
    with pytest.raises(ConfigError, match=rf"{key}=-?(inf|nan) is not a finite number"):
        finetune_main(["retrieval", *base, f"data.synth_dir={tmp_path / 's'}", f"{key}={value}"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


def test_a_synth_dir_a_run_built_must_hold_the_set_the_run_asks_for(tmp_path):
    out = tmp_path / "synth"
    synthesize_once(out, 12, seed=0, image_size=32)
    built = json.loads((out / SETTINGS_FILE).read_text())
    assert (built["n_images"], built["seed"], built["image_size"]) == (12, 0, 32)
    assert synthesize_once(out, 12, seed=0, image_size=32) == out  # the same set: reused
    for args, named in [
        ((20, 0, 32), "data.synth_images 12 there, 20 here"),
        ((12, 1, 32), "run.seed 0 there, 1 here"),
        ((12, 0, 48), "image size 32 there, 48 here"),
    ]:
        with pytest.raises(ValueError, match=re.escape(named)) as err:
            synthesize_once(out, *args)
        assert str(out) in str(err.value) and "delete" in str(err.value)
    (out / SETTINGS_FILE).unlink()  # a set built before the record existed
    with pytest.raises(ValueError, match=r"without synth\.json"):
        synthesize_once(out, 12, seed=0, image_size=32)


def test_a_set_made_by_dlip_data_synth_is_used_as_it_is(tmp_path):
    """Pointing data.synth_dir at a set built by hand is a choice, not a stale leftover."""
    synthesize(tmp_path / "mine", 12, seed=3, image_size=32, captions_per_image=2)
    assert synthesize_once(tmp_path / "mine", 1000, seed=42, image_size=64) == tmp_path / "mine"
    assert json.loads((tmp_path / "mine" / SETTINGS_FILE).read_text())["origin"] == "synthesize"


def test_a_run_refuses_another_synthetic_set_before_step_1(tmp_path):
    synth = tmp_path / "synth"
    synthesize_once(synth, 12, seed=0, image_size=32)
    run_dir = tmp_path / "run"
    args = [f"run.run_dir={run_dir}", "model.preset=test_tiny", f"data.synth_dir={synth}"]
    args += ["data.synth_images=30", "data.batch_size=2", "data.num_workers=0", "run.device=cpu"]
    with pytest.raises(ValueError, match=r"data\.synth_images 12 there, 30 here"):
        pretrain_main([*args, "run.max_steps=1"])
    assert not (run_dir / "metrics.jsonl").exists()
