"""ONNX Runtime as a Predictor backend (`Predictor.load(onnx_dir)`, dlip.inference.ort) and the
int8 ONNX export (`dlip export onnx --quantize int8`): outputs within stated tolerances of the
PyTorch model, captions through the same beam search, clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

import dlip
from dlip.cli import main
from dlip.inference import Predictor
from dlip.inference.index import ImageIndex, build_index
from dlip.inference.onnx import export_onnx, quantize_onnx_dir
from dlip.inference.ort import OnnxBLIP

PHOTOS = Path(dlip.__file__).parent / "assets" / "photos"
IMAGES = [PHOTOS / "chelsea.jpg", PHOTOS / "coffee.jpg", PHOTOS / "astronaut.jpg"]
TEXTS = ["a cat on a sofa", "a cup of coffee", "an astronaut in a suit"]


@pytest.fixture(scope="module")
def exported(perturbed_tiny, tmp_path_factory):
    """(PyTorch predictor, fp32 export dir, int8 export dir) of one perturbed test_tiny."""
    model = perturbed_tiny(0.05)
    root = tmp_path_factory.mktemp("ort")
    export_onnx(model, root / "fp32", source="perturbed test_tiny")
    quantize_onnx_dir(root / "fp32", root / "int8")
    return Predictor(model, "cpu"), root / "fp32", root / "int8"


def test_onnx_runtime_predictor_matches_pytorch(exported):
    torch_pred, fp32_dir, _ = exported
    ort_pred = Predictor.load(str(fp32_dir))
    assert isinstance(ort_pred.model, OnnxBLIP) and ort_pred.fingerprint == torch_pred.fingerprint
    a, b = torch_pred.embed_images(IMAGES), ort_pred.embed_images(IMAGES)
    assert (a - b).abs().max() < 1e-4
    ta, tb = torch_pred.embed_texts(TEXTS), ort_pred.embed_texts(TEXTS)
    assert (ta - tb).abs().max() < 1e-4
    ia, ib = torch_pred.itm_scores(IMAGES[0], TEXTS), ort_pred.itm_scores(IMAGES[0], TEXTS)
    assert (ia - ib).abs().max() < 1e-4
    for beams in (1, 3):  # greedy and beam search run the same loop over the ONNX stepper
        want = torch_pred.caption(IMAGES, num_beams=beams, max_length=12, batch_size=2)
        assert ort_pred.caption(IMAGES, num_beams=beams, max_length=12, batch_size=2) == want
    want = torch_pred.caption(IMAGES[:2], sample=True, seed=3, max_length=10)
    assert ort_pred.caption(IMAGES[:2], sample=True, seed=3, max_length=10) == want


def test_an_index_built_with_pytorch_is_searched_with_onnx_runtime(exported, tmp_path):
    torch_pred, fp32_dir, _ = exported
    build_index(torch_pred, PHOTOS, tmp_path / "index")
    ort_pred = Predictor.load(str(fp32_dir))
    index = ImageIndex.load(tmp_path / "index")
    want = torch_pred.search("a cat", index, k=3, rerank=2)
    got = ort_pred.search("a cat", index, k=3, rerank=2)
    assert [h.path for h in got] == [h.path for h in want]
    assert max(abs(g.score - w.score) for g, w in zip(got, want, strict=True)) < 1e-4


def test_int8_export_is_int8_and_within_tolerance(exported):
    torch_pred, _, int8_dir = exported
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["quantize"] == "int8"
    for name, entry in manifest["graphs"].items():
        graph = onnx.load(str(int8_dir / entry["file"])).graph
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in graph.node}
        weights = {w.name for w in graph.initializer}  # + a weight transposed in the graph
        weights |= {n.output[0] for n in graph.node if n.op_type == "Transpose"} & {
            n.output[0] for n in graph.node if n.input and n.input[0] in weights
        }
        float_linear = [
            n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights
        ]
        assert not float_linear, name  # every weight matrix is int8
        assert max(entry["int8_rel_error"].values()) < 0.1, name
    int8 = Predictor.load(str(int8_dir))
    assert int8.model.quantize == "int8"
    a, b = torch_pred.embed_images(IMAGES), int8.embed_images(IMAGES)
    assert (a * b).sum(-1).min() > 0.99  # cosine of unit vectors
    ta, tb = torch_pred.embed_texts(TEXTS), int8.embed_texts(TEXTS)
    assert (ta * tb).sum(-1).min() > 0.99
    ia, ib = torch_pred.itm_scores(IMAGES[0], TEXTS), int8.itm_scores(IMAGES[0], TEXTS)
    assert (ia - ib).abs().max() < 0.02  # match probabilities
    assert len(int8.caption(IMAGES, max_length=10)) == 3


def test_refusals_are_clear(exported, tmp_path):
    _, fp32_dir, _ = exported
    with pytest.raises(ValueError, match=r"--quantize int8"):
        Predictor.load(str(fp32_dir), quantize="int8")
    with pytest.raises(ValueError, match=r"runs on the CPU"):
        Predictor.load(str(fp32_dir), device="cuda")
    broken = tmp_path / "broken"
    shutil.copytree(fp32_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["graphs"]["itm"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"graphs \['itm'\] missing"):
        Predictor.load(str(broken))
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json: not a readable export manifest"):
        Predictor.load(str(broken))
    with pytest.raises(ValueError, match=r"already int8"):
        quantize_onnx_dir(exported[2], tmp_path / "again")


def test_cli_runs_an_onnx_directory(exported, capsys):
    _, fp32_dir, int8_dir = exported
    for model in (fp32_dir, int8_dir):
        args = ["caption", str(IMAGES[0]), "--model", str(model), "--max-length", "8", "--json"]
        assert main(args) == 0
        assert json.loads(capsys.readouterr().out)[0]["caption"]
