"""`dlip eval caption`: metrics equal pycocoevalcap's own scorers on the same data, input
errors are clear, the CLI writes a complete results.json, and a 2-process gloo run (uneven
shards) produces the 1-process captions and metrics. Java runs for real (PTBTokenizer, METEOR)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import dlip
from dlip.cli import main
from dlip.data.synthetic import synthesize
from dlip.eval.captioning import (
    METRICS,
    JavaNotFoundError,
    merge_captions,
    score_captions,
    spice_skip_reason,
)
from dlip.models.presets import get_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

REFS = {
    "img_a": [
        "A man riding a wave on top of a surfboard.",
        "a surfer rides a large wave in the ocean",
        "A person on a surfboard riding a wave.",
        "Surfer in a black wetsuit catching a wave.",
        "a man surfing on a big blue wave",
    ],
    "img_b": [
        "Two dogs playing with a frisbee in the grass.",
        "a pair of dogs run across a green field",
        "Two brown dogs chase a red frisbee on a lawn.",
        "dogs playing together in a park",
        "Two dogs are running after a flying disc.",
    ],
    "img_c": [
        "A plate of food with broccoli and rice.",
        "a white plate topped with rice, chicken and broccoli",
        "Some broccoli and meat next to rice on a dish.",
        "A healthy meal of vegetables and rice on a plate.",
        "a dinner plate with broccoli, rice and chicken",
    ],
    "img_d": [
        "A red double decker bus driving down a street.",
        "a big red bus on a city street",
        "The double-decker bus is parked by the curb.",
        "A tour bus drives past tall buildings.",
        "red bus traveling down the road in a city",
    ],
}
PREDS = {
    "img_a": "a man riding a wave on a surfboard",
    "img_b": "two dogs running in the grass with a frisbee",
    "img_c": "a plate of rice and broccoli",
    # img_d is left out: only predicted images are scored (ids a subset of the references)
}


def java_children() -> list[int]:
    """Pids of live `java` processes whose parent is this test process."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if comm == "java" and int(ppid) == me and state != "Z":
            found.append(int(entry.name))
    return found


def direct_scores(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """pycocoevalcap's scorers called here, as COCOEvalCap calls them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in preds})
    res = tok.tokenize({i: [{"caption": c}] for i, c in preds.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    meteor = Meteor()
    m, _ = meteor.compute_score(gts, res)
    del meteor
    return {
        **{f"Bleu_{n + 1}": b for n, b in enumerate(bleu)},
        "METEOR": m,
        "ROUGE_L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


# ---------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """score_captions(PREDS, REFS) run in an empty cwd: (scores, files left in cwd, java pids)."""
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        scores = score_captions(PREDS, REFS)
    finally:
        os.chdir(old)
    return scores, sorted(p.name for p in cwd.iterdir()), java_children()


def test_score_captions_equals_pycocoevalcap(scored):
    scores, _, _ = scored
    assert list(scores) == list(METRICS)
    assert all(isinstance(v, float) for v in scores.values())
    expected = direct_scores(PREDS, REFS)
    for name in METRICS:
        assert scores[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
    # pycocoevalcap's scale: fractions for BLEU/METEOR/ROUGE, CIDEr around 1
    assert 0.3 < scores["Bleu_1"] <= 1 and 0 < scores["METEOR"] < 1
    assert scores["CIDEr"] > 0.5


def test_scoring_leaves_no_files_and_no_java_process(scored):
    _, files, javas = scored
    assert files == []
    assert javas == []


def test_prediction_equal_to_a_reference_scores_perfect_bleu_and_rouge():
    preds = {i: refs[1] for i, refs in REFS.items()}
    scores = score_captions(preds, REFS)
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["METEOR"] > 0.8
    assert java_children() == []


def test_bad_inputs_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"no references.*'img_zzz'"):
        score_captions({**PREDS, "img_zzz": "a cat"}, REFS)
    with pytest.raises(ValueError, match="empty predictions"):
        score_captions({}, REFS)
    with pytest.raises(ValueError, match=r"'img_a'.*not a string"):
        score_captions({"img_a": None}, REFS)  # type: ignore[dict-item]
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    with pytest.raises(JavaNotFoundError, match=r"need Java.*default-jre-headless"):
        score_captions(PREDS, REFS)


def test_merge_captions_dedupes_and_requires_every_image():
    pairs = [("b", "x"), ("a", "y"), ("b", "x")]  # a padded shard repeats an image
    assert merge_captions(pairs, ["a", "b"]) == {"a": "y", "b": "x"}
    with pytest.raises(RuntimeError, match=r"1 image\(s\) without a caption.*'c'"):
        merge_captions(pairs, ["a", "b", "c"])
    with pytest.raises(RuntimeError, match=r"1 unknown id"):
        merge_captions(pairs, ["a"])


# -------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 synthetic images (5 in test: odd) and a random test_tiny captioner at 32 px."""
    root = tmp_path_factory.mktemp("caption")
    synthesize(root / "synth", 12, image_size=32)
    model = dlip.create_model("test_tiny")
    model.set_image_size(32)
    dlip.save(model, root / "model")
    return root


def cli_args(root: Path, out: Path, *extra: str) -> list[str]:
    data = root / "synth"
    return [
        "eval", "caption", "--model", str(root / "model"), "--data", str(data / "test.json"),
        "--images", str(data), "--out", str(out), "--device", "cpu", "--num-workers", "0",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_writes_complete_results(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(cli_args(setup, out, "--batch-size", "2", "--spice", "--beam-scoring", "hf")) == 0
    record = json.loads((out / "results.json").read_text())
    ids = [e["image"] for e in json.loads((setup / "synth" / "test.json").read_text())]
    assert record["task"] == "caption" and record["world_size"] == 1
    assert record["model"]["name"] == "test_tiny" and record["model"]["params"] > 0
    assert record["dataset"]["num_images"] == len(ids) == 5
    assert record["dataset"]["name"] == "test"
    assert record["settings"] == {
        "prompt": "a picture of ", "num_beams": 3, "max_length": 20, "min_length": 5,
        "repetition_penalty": 1.0, "beam_scoring": "hf", "image_size": 32, "batch_size": 2,
        "precision": "auto",
    }  # fmt: skip
    assert list(record["metrics"]) == [*METRICS, "SPICE"]
    assert all(isinstance(record["metrics"][k], float) for k in METRICS)
    assert record["spice"]["requested"] is True
    if spice_skip_reason() is not None:  # no CoreNLP 3.6.0 jars (offline): null + the reason
        assert record["metrics"]["SPICE"] is None
        assert "stanford-corenlp-3.6.0" in record["spice"]["reason"]
        assert "SPICE skipped" in capsys.readouterr().out
    else:  # jars present: a value, or a recorded failure (Java 16+), never a crash
        assert record["metrics"]["SPICE"] == record["spice"]["value"]
        assert record["spice"]["value"] is not None or "SPICE failed" in record["spice"]["reason"]
    preds = record["predictions"]
    assert [p["image_id"] for p in preds] == [Path(i).stem for i in ids]
    assert all(isinstance(p["caption"], str) and p["caption"] for p in preds)
    assert "a picture of" not in preds[0]["caption"]  # the prompt is stripped
    assert json.loads((out / "captions.json").read_text()) == preds
    assert record["seconds"]["total"] >= record["seconds"]["generation"] > 0
    md = (out / "results.md").read_text()
    assert "| test_tiny |" in md and "x100" in md


def test_cli_rejects_a_model_without_decoder(setup, tmp_path, capsys):
    cfg = get_config("test_tiny").replace(has_decoder=False)
    dlip.save(dlip.BLIP(cfg), tmp_path / "retrieval")
    args = cli_args(setup, tmp_path / "out")
    args[args.index("--model") + 1] = str(tmp_path / "retrieval")
    assert main(args) == 2
    assert "has no decoder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Batch 1 on both sides: every image sees the same computation, so captions must match.
    single = subprocess.Popen(
        [sys.executable, "-m", "dlip", *cli_args(setup, one, "--batch-size", "1")],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ddp = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "dlip", *cli_args(setup, two, "--batch-size", "1"),
    ]  # fmt: skip
    res = subprocess.run(ddp, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-3000:]
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    assert len(r2["predictions"]) == 5  # shards of 3 and 2 images, nothing lost or doubled
    assert r2["predictions"] == r1["predictions"]
    assert r2["metrics"] == r1["metrics"]
