"""int8 inference (`Predictor.load(..., quantize="int8")`, `--quantize int8`): every linear layer
int8, outputs within stated tolerances of float32; refused where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dlip
from dlip.cli import main
from dlip.inference import Predictor

PHOTOS = Path(dlip.__file__).parent / "assets" / "photos"
IMAGES = [PHOTOS / "chelsea.jpg", PHOTOS / "coffee.jpg", PHOTOS / "astronaut.jpg"]


@pytest.fixture(scope="module")
def pair(perturbed_tiny):
    model = perturbed_tiny(0.05)
    return Predictor(model, "cpu"), Predictor(model, "cpu", quantize="int8")


def test_every_linear_layer_is_int8_and_the_float_model_is_untouched(pair):
    fp32, int8 = pair
    linear = [m for m in int8.model.modules() if type(m) is torch.nn.Linear]
    dynamic = [m for m in int8.model.modules() if "quantized" in type(m).__module__]
    assert not linear and len(dynamic) >= 20
    assert any(type(m) is torch.nn.Linear for m in fp32.model.modules())
    assert int8.fingerprint == fp32.fingerprint  # the same weights, run another way


def test_int8_outputs_are_within_tolerance(pair):
    fp32, int8 = pair
    a, b = fp32.embed_images(IMAGES), int8.embed_images(IMAGES)  # (3, E) unit vectors
    assert (a * b).sum(-1).min() > 0.99
    texts = ["a cat on a sofa", "a cup of coffee", "an astronaut"]
    ta, tb = fp32.embed_texts(texts), int8.embed_texts(texts)
    assert (ta * tb).sum(-1).min() > 0.99
    ia, ib = fp32.itm_scores(IMAGES[0], texts), int8.itm_scores(IMAGES[0], texts)
    assert (ia - ib).abs().max() < 0.02  # match probabilities
    pixels = fp32.pixels(IMAGES)
    ids, mask = fp32.tokenize(texts)
    with torch.no_grad():
        la = fp32.model.lm_logits(fp32.model.encode_image(pixels).tokens, ids, mask)
        lb = int8.model.lm_logits(int8.model.encode_image(pixels).tokens, ids, mask)
    assert ((la - lb).norm() / la.norm()) < 0.05  # relative error of the LM logits
    assert len(int8.caption(IMAGES, max_length=8)) == 3


def test_int8_is_refused_where_it_cannot_run(pair):
    model = pair[0].model
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        Predictor(model, "cpu", dtype="bfloat16", quantize="int8")
    with pytest.raises(ValueError, match="expected one of"):
        Predictor(model, "cpu", quantize="int4")


def test_cli_quantize_flag(capsys, model_dir):
    args = ["caption", str(IMAGES[0]), "--model", str(model_dir), "--max-length", "6"]
    assert main([*args, "--quantize", "int8", "--json"]) == 0
    assert '"caption"' in capsys.readouterr().out
