"""`dlip convert --to hf` writes what the hub ecosystem loads: transformers' AutoProcessor,
pipeline("image-to-text") and BlipForImageTextRetrieval read the export offline and reproduce
dlip's pixels, token ids, scores and captions on the bundled photos; the model card carries the
metrics of a results.json; a DLIP-topology student is refused with what an export would lose."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

import dlip
from dlip.cli import main
from dlip.eval.common import results_record
from dlip.models.generation import generate_ids
from dlip.tokenizer import get_tokenizer
from dlip.transforms import load_image, preprocess

transformers = pytest.importorskip("transformers")

TEXTS = ["A cat, sitting on a sofa!", "an astronaut in a white suit", "coffee"]
ENC_ID = 30523


@pytest.fixture(scope="module")
def photos():
    root = resources.files("dlip") / "assets/photos"
    return [load_image(p) for p in sorted(root.iterdir()) if p.name.endswith(".jpg")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """test_tiny (encoder + tied decoder), perturbed so every path matters, exported to HF."""
    tmp = tmp_path_factory.mktemp("hf_export")
    torch.manual_seed(0)
    model = dlip.create_model("test_tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    dlip.save(model, tmp / "ours")
    record = results_record(
        "retrieval",
        dataset="coco_karpathy_test",
        metrics={"txt_r1": 41.25, "img_r1": 30.5, "r_mean": 57.125},
        metrics_itc={"r_mean": 55.0},
    )
    (tmp / "results.json").write_text(json.dumps(record))
    argv = ["convert", str(tmp / "ours"), "--to", "hf", "--out", str(tmp / "hf")]
    assert main([*argv, "--results", str(tmp / "results.json"), "--license", "mit"]) == 0
    return model, tmp / "hf"


def test_auto_processor_gives_dlips_pixels_and_ids(exported, photos):
    model, hf_dir = exported
    for form in ("retrieval", "captioning"):
        proc = transformers.AutoProcessor.from_pretrained(str(hf_dir / form))
        batch = proc(images=photos, text=TEXTS, padding="longest", return_tensors="pt")
        ours = get_tokenizer()(TEXTS, max_length=35, padding="longest")
        torch.testing.assert_close(
            batch["pixel_values"], preprocess(model.config, photos), atol=1e-5, rtol=0
        )
        assert batch["input_ids"].tolist() == ours["input_ids"].tolist(), form
        assert batch["attention_mask"].tolist() == ours["attention_mask"].tolist(), form
        assert proc.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, ENC_ID]


@torch.no_grad()
def test_retrieval_class_reproduces_dlips_scores(exported, photos):
    model, hf_dir = exported
    hf = transformers.BlipForImageTextRetrieval.from_pretrained(str(hf_dir / "retrieval")).eval()
    proc = transformers.AutoProcessor.from_pretrained(str(hf_dir / "retrieval"))
    batch = proc(images=photos, text=TEXTS, padding="longest", return_tensors="pt")
    pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
    sims = model.encode_image(pixels).feat @ model.encode_text(ids, mask).feat.T  # (3, 3)
    torch.testing.assert_close(ref.itm_score, sims, atol=1e-5, rtol=0)
    assert sims.std() > 1e-3  # not a comparison of constants
    enc = ids.clone()
    enc[:, 0] = ENC_ID  # BLIP's ITM input, as the model card says
    itm = hf(input_ids=enc, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    ours = model.itm_logits(model.encode_image(pixels).tokens, enc, mask)
    torch.testing.assert_close(itm, ours, atol=1e-5, rtol=0)


def test_image_to_text_pipeline_captions_as_dlip(exported, photos):
    """transformers 5.x folds "image-to-text" into "image-text-to-text", which needs a text:
    BLIP's prompt. Its BLIP generate does not pass the exported generation config on to the text
    decoder (greedy, 20 new tokens without them), so the settings go in as generate_kwargs, as
    the model card says."""
    model, hf_dir = exported
    captioner = transformers.pipeline("image-text-to-text", model=str(hf_dir / "captioning"))
    settings = json.loads((hf_dir / "captioning/generation_config.json").read_text())
    blip = {k: settings[k] for k in ("num_beams", "max_length", "min_length")}
    assert blip == {"num_beams": 3, "max_length": 20, "min_length": 5}
    prompt = "a picture of"
    out = captioner(
        images=photos, text=[prompt] * len(photos), return_full_text=False, generate_kwargs=blip
    )
    got = [(row[0] if isinstance(row, list) else row)["generated_text"].strip() for row in out]
    tok = get_tokenizer()
    pixels = preprocess(model.config, photos)
    with torch.no_grad():  # BLIP's settings; transformers 5.x's beam rule
        ids = generate_ids(model, pixels, prompt, 3, 20, 5, 1.0, tok, beam_scoring="hf")
    n_prompt = len(tok.encode(prompt)) - 1  # [DEC] + the prompt's words
    assert got == [tok.decode(row[n_prompt:]) for row in ids]
    assert len({*got}) > 1 and all(got)  # captions per photo, not empty strings


def test_model_card_names_model_metrics_and_license(exported):
    model, hf_dir = exported
    card = (hf_dir / "retrieval/README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    assert "BlipForImageTextRetrieval" in card and model.config.name in card
    assert "| retrieval | coco_karpathy_test | ITC + ITM re-rank | r_mean | 57.12 |" in card
    assert "| retrieval | coco_karpathy_test | ITC only | r_mean | 55.00 |" in card
    caption_card = (hf_dir / "captioning/README.md").read_text()
    assert "pipeline_tag: image-to-text" in caption_card


def test_bad_results_file_fails_before_writing(tmp_path, capsys):
    dlip.save(dlip.create_model("test_tiny"), tmp_path / "m")
    (tmp_path / "r.json").write_text('{"metrics": {}}')
    argv = ["convert", str(tmp_path / "m"), "--to", "hf", "--out", str(tmp_path / "x")]
    assert main([*argv, "--results", str(tmp_path / "r.json")]) == 2
    assert "no 'task' field" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_dlip_topology_is_refused_naming_what_would_be_lost(tmp_path, capsys):
    cfg = dlip.get_config("test_tiny")
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "fusion_layers": 1}))
    dlip.save(dlip.create_model(cfg), tmp_path / "m")
    code = main(["convert", str(tmp_path / "m"), "--to", "hf", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "lose the ITC text features" in err and "dlip export onnx" in err
