"""benchmarks/ablations.py and benchmarks/demo_seeds.py without their hours of training: every
ablation setting is a valid run config that changes what its name says, and the seed summary
computes what docs/demo.md reports."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import yaml

from dlip.demo.pipeline import Layout, write_config
from dlip.demo.plan import KD_WEIGHTS, DemoPlan
from dlip.losses.adapters import KD_TERMS
from dlip.train.config import load


def test_every_ablation_setting_is_a_valid_run_that_changes_what_it_names(
    benchmark_script, tmp_path
):
    ab = benchmark_script("ablations")
    demo = tmp_path / "demo"  # the layout a `dlip demo` run leaves (the teacher is not read)
    (demo / "data").mkdir(parents=True)
    (demo / "teacher_captions.jsonl").write_text("")  # made once by the sweep; present here
    table = ab.settings()
    assert {"none", "all", "init_only", "all_random_init", "all+finetune_kd"} <= set(table)
    plan = replace(DemoPlan.full(), student_steps=200)
    terms, manifests = {}, {}
    for name, spec in table.items():
        lay = Layout(tmp_path / "work" / name)
        lay.data = demo / "data"
        raw = ab.student_config(demo, lay, spec, plan)
        assert raw["run"]["max_steps"] == 200
        cfg = load(write_config(lay, "pretrain", raw), [], validate=False)
        terms[name] = set(cfg.loss.kd.enabled)
        manifests[name] = list(cfg.data.manifests)
        assert (cfg.teacher.checkpoint is not None) == spec["kd"], name
        want_init = "random" if name in ("none", "all_random_init") else "inherit_pruned"
        assert cfg.model.init == want_init, name
        assert yaml.safe_load((lay.configs / "pretrain.yaml").read_text()) == raw
    assert terms["all"] == set(KD_WEIGHTS) == terms["all_random_init"]
    assert terms["none"] == set() == terms["init_only"]
    assert terms["all+feat"] == set(KD_WEIGHTS) | {"kd_feat"}
    assert terms["all+icl_queue"] == set(KD_WEIGHTS) | {"kd_icl"}
    assert manifests["all+teacher_captions"] == [
        *manifests["all"],
        str(demo / "teacher_captions.jsonl"),
    ]
    for module, stream in (("image", "image"), ("text", "text"), ("fusion", "fusion"),
                           ("decoder", "decoder")):  # fmt: skip
        assert terms[f"module_{module}"], module
        assert all(KD_TERMS[t].stream == stream for t in terms[f"module_{module}"]), module
    kinds = {"logits": {"logits"}, "features": {"rep", "hidden"}, "attention": {"attn"}}
    for kind, allowed in kinds.items():
        assert all(KD_TERMS[t].kind in allowed for t in terms[f"kind_{kind}"]), kind
    # the module and kind groups each cover the demo's terms exactly once
    for group in (ab.MODULES, ab.KINDS):
        flat = [t for ts in group.values() for t in ts]
        assert sorted(flat) == sorted(KD_WEIGHTS)


def test_the_sweep_refuses_a_folder_without_a_teacher(benchmark_script, tmp_path):
    ab = benchmark_script("ablations")
    args = type("Args", (), {"settings": "all", "demo": tmp_path, "seeds": "0",
                             "budget_minutes": 1, "work": tmp_path, "vqa": False,
                             "student_steps": 2})()  # fmt: skip
    with pytest.raises(SystemExit, match="no demo run with a pretrained teacher"):
        ab.sweep(args)
    args.settings = "bogus"
    with pytest.raises(SystemExit, match="unknown settings"):
        ab.sweep(args)


def test_finetune_kd_setting_gives_valid_finetuning_configs(benchmark_script, tmp_path):
    """all+finetune_kd's finetuning runs: the task's KD terms from the teacher's finetuned model,
    nothing of pretraining's settings (a model.init key there was a ConfigError)."""
    from dlip.demo.pipeline import finetune_config
    from dlip.demo.plan import TASKS
    from dlip.train.config import FinetuneConfig

    ab = benchmark_script("ablations")
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    plan = replace(DemoPlan.full(), student_steps=200)
    lay = Layout(tmp_path / "work")
    lay.data = demo / "data"
    want = {"retrieval": {"kd_itc", "kd_rep_text"}, "caption": {"kd_lm", "kd_attn_decoder"}}
    for task in TASKS:
        raw = ab.finetune_kd_config(demo, finetune_config(plan, lay, "student", task), task)
        cfg = load(write_config(lay, task, raw), [], validate=False, cls=FinetuneConfig)
        assert set(cfg.loss.kd.enabled) == want[task]
        assert cfg.teacher.checkpoint == str(demo / "teacher" / task / "best")


def test_demo_seeds_summary_is_mean_and_sample_sd(benchmark_script):
    ds = benchmark_script("demo_seeds")

    def results(t: float, kd: float, nokd: float) -> dict:
        def entry(r: float, cider: float) -> dict:
            return {"r_mean": r, "itc_only": {"r_mean": r - 2}, "CIDEr": cider,
                    "Bleu_4": 0.2, "vqa_overall": 50.0}  # fmt: skip

        return {"teacher": entry(t, 1.0), "student_kd": entry(kd, 0.9),
                "student_nokd": entry(nokd, 0.5), "this_invocation_seconds": 900.0}  # fmt: skip

    rows = [ds.row(s, results(*v), None) for s, v in enumerate([(60, 57, 40), (64, 62, 41)])]
    assert rows[0]["kd_r_mean_share"] == pytest.approx(0.95)
    assert rows[1]["kd_lead_over_nokd"] == pytest.approx(21)
    assert rows[0]["teacher_itm_gain"] == pytest.approx(2)
    stats = ds.summarise(rows)
    assert stats["teacher_r_mean"]["mean"] == pytest.approx(62)
    assert stats["teacher_r_mean"]["sd"] == pytest.approx(statistics.stdev([60, 64]))
    assert stats["kd_CIDEr_share"]["mean"] == pytest.approx(0.9)
    table = ds.table(stats)
    assert "| teacher | 62.00 ± 2.83 |" in table and "15.0 ± 0.0 min" in table
