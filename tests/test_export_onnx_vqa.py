"""`dlip export onnx` of a VQA model: its three graphs with parity, the manifest's VQA usage, and
BLIP's rank-mode answer computed from the exported graphs alone in onnxruntime equal to
`BLIP.answer`'s (padded questions included)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import dlip
from dlip.cli import main
from dlip.inference import onnx as export
from dlip.models import vqa
from dlip.tokenizer import get_tokenizer, pre_question

ANSWERS = ["yes", "no", "red", "blue", "2", "3", "a red circle", "left of the square"]
QUESTIONS = ["what colour is the circle?", "how many shapes are in this small picture?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = dlip.create_model(dlip.get_config("test_tiny").vqa_form()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("text_encoder", "text_decoder")) and "LayerNorm" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp("onnx_vqa")
    saved = dlip.save(model, root / "model")
    assert main(["export", "onnx", str(saved), "--out", str(root / "onnx")]) == 0
    return model, root / "onnx"


def _run(path, **feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def test_manifest_lists_the_vqa_graphs(exported):
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["graphs"]) == list(export.VQA_GRAPHS)
    assert manifest["decoder"] is None and "rank" in manifest["vqa"]["usage"]
    for entry in manifest["graphs"].values():
        assert max(entry["parity_max_abs_diff"].values()) <= 1e-4
    answer = {i["name"]: i for i in manifest["graphs"]["answer_decoder"]["inputs"]}
    assert answer["question_mask"]["dtype"] == "int64"
    assert answer["question_states"]["shape"] == ["batch", "question_seq", 32]
    outputs = [o["name"] for o in manifest["graphs"]["image_encoder"]["outputs"]]
    assert outputs == ["image_embeds"]  # no ITC head in the VQA form


@torch.no_grad()
def test_rank_mode_from_the_onnx_graphs_equals_blip_answer(exported):
    model, out = exported
    tok = get_tokenizer()
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32)
    want = model.answer(pixels, QUESTIONS, ANSWERS, k_test=len(ANSWERS))
    (image,) = _run(out / "image_encoder.onnx", pixels=pixels)
    q_ids, q_mask = vqa.question_inputs(tok, [pre_question(q) for q in QUESTIONS])
    assert not q_mask.all()  # the first question is padded
    (states,) = _run(out / "question_encoder.onnx", image_embeds=torch.from_numpy(image),
                     input_ids=q_ids, attention_mask=q_mask)  # fmt: skip
    a_ids, a_mask = vqa.answer_inputs(tok, ANSWERS)
    got = []
    for b in range(2):
        n = len(ANSWERS)
        (logits,) = _run(out / "answer_decoder.onnx",
                         question_states=torch.from_numpy(states[b : b + 1]).expand(n, -1, -1),
                         question_mask=q_mask[b : b + 1].expand(n, -1),
                         input_ids=a_ids, attention_mask=a_mask)  # fmt: skip
        logits = torch.from_numpy(logits)[:, :-1]  # (N, Ta-1, V)
        targets = vqa.answer_targets(a_ids, a_mask)
        loss = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=0.1,
            reduction="none",
        ).view(n, -1).sum(1)  # fmt: skip
        got.append(ANSWERS[int(loss.argmin())])
        states_pt = model.multimodal(model.encode_image(pixels[b : b + 1]).tokens, q_ids[b : b + 1],
                                     q_mask[b : b + 1]).tokens.expand(n, -1, -1)  # fmt: skip
        ref = vqa.answer_logits(model, states_pt, q_mask[b : b + 1].expand(n, -1), a_ids, a_mask)
        want_loss = vqa.answer_token_loss(ref[:, :-1], targets)  # every candidate's score
        torch.testing.assert_close(loss, want_loss, atol=1e-3, rtol=1e-5)
    assert got == want
