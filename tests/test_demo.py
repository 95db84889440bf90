"""`dlip demo --quick`: the artifacts exist and agree with each other (not the accuracy), a rerun
resumes instead of retraining, and a run folder of another plan is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from PIL import Image

from dlip.cli import main
from dlip.demo.plan import MODELS, DemoPlan
from dlip.eval.captioning import METRICS as CAPTION_METRICS

pytestmark = pytest.mark.usefixtures("one_thread")

RETRIEVAL_METRICS = (
    "txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean",
    "r_mean",
)  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_results_json_holds_the_three_models(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    assert results["demo"] == DemoPlan.quick().to_dict()
    for model in MODELS:
        entry = results[model]
        assert isinstance(entry["params"], int) and entry["params"] > 0
        for name in (*RETRIEVAL_METRICS, *CAPTION_METRICS):
            assert isinstance(entry[name], float), (model, name)
        # the numbers are the ones `dlip eval` wrote for the best finetuned checkpoints
        ret = json.loads((demo_run / model / "retrieval" / "test" / "results.json").read_text())
        cap = json.loads((demo_run / model / "caption" / "test" / "results.json").read_text())
        assert {k: entry[k] for k in RETRIEVAL_METRICS} == ret["metrics"]
        assert {k: entry[k] for k in cap["metrics"]} == cap["metrics"]  # + SPICE: None
        assert entry["itc_only"] == ret["metrics_itc"]
        vqa = json.loads((demo_run / model / "vqa" / "test" / "results.json").read_text())
        assert entry["vqa_overall"] == vqa["overall"] and 0 <= vqa["overall"] <= 100
        assert entry["vqa_per_answer_type"] == vqa["per_answer_type"]
        assert ret["settings"]["k"] == DemoPlan.quick().k_test
        assert set(entry["latency_ms"]) == {"image_embed", "itm_rerank_k4", "caption_3beam"}
        assert all(v > 0 for v in entry["latency_ms"].values())
        assert set(entry["samples"]) == set(results["sample_images"])
    teacher, student = results["teacher"], results["student_kd"]
    assert results["student_nokd"]["params"] == student["params"]
    assert teacher["params"] > student["params"]
    share = results["share_of_teacher"]["student_kd"]
    assert share["flops_image_embed"] < 0.34  # "about 3x fewer image FLOPs"
    assert share["params"] == round(student["params"] / teacher["params"], 4)


def test_every_stage_left_its_run(demo_run):
    for model in MODELS:
        assert (demo_run / model / "pretrain" / "final" / "model.safetensors").is_file()
        for task in ("retrieval", "caption", "vqa"):
            assert (demo_run / model / task / "best" / "model.safetensors").is_file()
    kd = (demo_run / "configs" / "pretrain_student_kd.yaml").read_text()
    nokd = (demo_run / "configs" / "pretrain_student_nokd.yaml").read_text()
    assert "kd_itc" in kd and "checkpoint" in kd and "kd_" not in nokd
    rows = (demo_run / "student_kd" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in rows]
    assert max(steps) == DemoPlan.quick().student_steps


def test_report_and_plots(demo_run):
    report = (demo_run / "report.md").read_text()
    results = json.loads((demo_run / "results.json").read_text())
    for label in ("| teacher |", "| student + KD |", "| student, no KD |"):
        assert label in report
    assert f"**{results['teacher']['r_mean']:.2f}**" in report
    assert "VQA %" in report and f"| {results['teacher']['vqa_overall']:.2f} |" in report
    assert "-" not in [c.strip() for c in report.split("| teacher |")[1].split("\n")[0].split("|")]
    for png in ("loss_curves.png", "accuracy_vs_latency.png"):
        with Image.open(demo_run / png) as im:
            assert im.format == "PNG" and im.width > 500
        assert f"]({png})" in report
    for name in results["sample_images"]:
        assert (demo_run / "samples" / f"{name}.jpg").is_file()
        assert f"samples/{name}.jpg" in report


def test_rerun_resumes_and_redoes_only_what_is_missing(demo_run, capsys):
    before = json.loads((demo_run / "results.json").read_text())
    shutil.rmtree(demo_run / "student_nokd" / "caption" / "test")  # as if killed before the test
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 12  # every stage but the one whose output was removed
    assert "resuming from" in out  # its training is not redone: the last checkpoint is loaded
    after = json.loads((demo_run / "results.json").read_text())
    for model in MODELS:
        assert after[model]["r_mean"] == before[model]["r_mean"]
    assert after["student_nokd"]["CIDEr"] == before["student_nokd"]["CIDEr"]


def test_a_folder_of_another_plan_is_refused(demo_run):
    with pytest.raises(SystemExit, match="other settings"):
        main(["demo", "--out", str(demo_run)])  # the full plan on a quick run's folder
    with pytest.raises(SystemExit, match="other settings"):  # another seed is another plan
        main(["demo", "--quick", "--seed", "1", "--out", str(demo_run)])


def test_the_seed_reaches_every_config_and_the_data(tmp_path):
    """--seed S: the synthetic data and every stage's run.seed use S (benchmarks/demo_seeds.py
    relies on it for its mean +- sd)."""
    from dataclasses import replace

    from dlip.demo.pipeline import Layout, stages

    lay = Layout(tmp_path)
    todo = stages(replace(DemoPlan.quick(), seed=7), lay)
    assert "seed 7" in todo[0].command
    configs = sorted((tmp_path / "configs").glob("*.yaml"))
    assert len(configs) == len(todo) - 1  # one per training stage
    for path in configs:
        assert yaml.safe_load(path.read_text())["run"]["seed"] == 7, path.name


def test_fresh_refuses_a_folder_that_is_not_a_demo_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not a demo run folder"):
        main(["demo", "--quick", "--fresh", "--out", str(tmp_path)])
    assert (tmp_path / "precious.txt").is_file()
