"""`dlip export onnx`: graphs, dynamic axes, parity with PyTorch in onnxruntime, the manifest.

Each dynamo export costs ~8-12 s on the 2-core CPU, so the file exports test_tiny once (all five
graphs, through the CLI) and exports dlip_small's widths and heads with fewer layers (vision
depth 2, text 2 layers of which 1 fusion, 64 px) for three graphs: the full 55M-param
dlip_small takes ~90 s for its five graphs here (measured with `dlip export onnx dlip_small`).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import dlip
from dlip.cli import main
from dlip.inference import onnx as export
from dlip.losses.itm import with_first_token
from dlip.models.config import ModelConfig
from dlip.models.presets import get_config
from dlip.tokenizer import get_tokenizer

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test_tiny saved with its own weights, exported by the CLI: (model, out dir, exit code)."""
    torch.manual_seed(0)
    model = dlip.create_model("test_tiny").eval()
    root = tmp_path_factory.mktemp("onnx")
    saved = dlip.save(model, root / "model")
    code = main(["export", "onnx", str(saved), "--out", str(root / "onnx")])
    return model, root / "onnx", code


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _close(onnx_out: np.ndarray, ref: torch.Tensor) -> float:
    assert onnx_out.shape == tuple(ref.shape)
    diff = float(np.abs(onnx_out - ref.detach().numpy()).max())
    assert diff <= ATOL, diff
    return diff


def test_cli_writes_manifest(tiny):
    model, out, code = tiny
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["graphs"]) == list(export.GRAPHS)
    for entry in manifest["graphs"].values():
        assert (out / entry["file"]).is_file()
        assert max(entry["parity_max_abs_diff"].values()) <= ATOL
    image = manifest["graphs"]["image_encoder"]
    pixels = {"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 32, 32]}
    assert image["inputs"] == [pixels]
    assert [o["shape"] for o in image["outputs"]] == [["batch", 5, 32], ["batch", 16]]
    nxt = {i["name"]: i["shape"] for i in manifest["graphs"]["decoder_next"]["inputs"]}
    assert nxt["attention_mask"] == ["batch", "past_seq+seq"]
    assert nxt["past_self_1_value"] == ["batch", 2, "past_seq", 16]
    assert nxt["past_cross_0_key"] == ["batch", 2, 5, 16]
    tok = manifest["tokenizer"]
    assert (tok["enc_token_id"], tok["dec_token_id"], tok["pad_token_id"]) == (30523, 30522, 0)
    assert manifest["preprocessing"]["image_size"] == 32
    assert manifest["preprocessing"]["mean"] == list(model.config.image_mean)
    assert manifest["model"] == json.loads(json.dumps(model.config.to_dict()))
    assert manifest["decoder"]["kv_cache"] is True
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime"}
    # The graph files carry the manifest's axis names.
    names = [d.dim_param or d.dim_value for d in _session_shape(out / "decoder_next.onnx")]
    assert names == ["batch", "past_seq+seq"]


def _session_shape(path):
    import onnx

    graph = onnx.load(str(path)).graph
    mask = next(v for v in graph.input if v.name == "attention_mask")
    return mask.type.tensor_type.shape.dim


def test_tiny_encoders_and_itm_match_pytorch(tiny):
    """Re-check outside the exporter, at a batch and lengths the export never saw."""
    model, out, _ = tiny
    torch.manual_seed(3)
    pixels = torch.randn(4, 3, 32, 32)
    emb, feat = _session(out / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})
    image = model.encode_image(pixels)
    _close(emb, image.tokens), _close(feat, image.feat)

    tok = get_tokenizer()
    batch = tok(["a cat", "two dogs play on the grass", "a red bus", "x"], padding="longest")
    ids, mask = batch["input_ids"][:, :11], batch["attention_mask"][:, :11]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    text_feat, text_cls = _session(out / "text_encoder.onnx").run(None, feeds)
    text = model.encode_text(ids, mask)
    _close(text_feat, text.feat), _close(text_cls, text.tokens[:, 0])

    enc_ids = with_first_token(ids, tok.enc_token_id)
    feeds = {"image_embeds": image.tokens.detach().numpy(), "input_ids": enc_ids.numpy()}
    (itm,) = _session(out / "itm.onnx").run(None, feeds | {"attention_mask": mask.numpy()})
    _close(itm, model.itm_logits(image.tokens, enc_ids, mask))


@torch.no_grad()
def test_tiny_cached_decoder_matches_full_sequence_logits(tiny):
    """Greedy decoding in onnxruntime through the KV cache == PyTorch's full-sequence
    (uncached) logits at every step: independent of the cache code on both sides."""
    model, out, _ = tiny
    first, nxt = _session(out / "decoder_first.onnx"), _session(out / "decoder_next.onnx")
    torch.manual_seed(4)
    image = model.encode_image(torch.randn(2, 3, 32, 32)).tokens
    seq = torch.tensor([[30522, 1037, 3861, 1997]] * 2)  # [DEC] a picture of
    outs = first.run(
        None,
        {
            "image_embeds": image.numpy(),
            "input_ids": seq.numpy(),
            "attention_mask": np.ones(seq.shape, np.int64),
        },
    )
    names = [o.name for o in first.get_outputs()]
    present = dict(zip(names[1:], outs[1:], strict=True))
    step_logits = [outs[0][:, -1]]
    for _ in range(4):
        new = torch.from_numpy(step_logits[-1]).argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat([seq, new], 1)
        feeds = {"input_ids": new.numpy(), "attention_mask": np.ones(seq.shape, np.int64)}
        feeds |= {k.replace("present", "past"): v for k, v in present.items()}
        outs = nxt.run(None, feeds)
        present |= dict(zip([o.name for o in nxt.get_outputs()][1:], outs[1:], strict=True))
        assert outs[1].shape[2] == seq.shape[1]  # the self cache grew by one token
        step_logits.append(outs[0][:, -1])
    full = model.lm_logits(image, seq, torch.ones_like(seq))  # (B, T, V), no cache
    for i, logits in enumerate(step_logits):
        _close(logits, full[:, 3 + i])


def test_dlip_small_shapes_export_with_parity(tmp_path):
    """dlip_small's widths and heads (vision 384/6 heads, text 384/12 heads, FFN 3072) with
    vision depth 2, text 2 layers (1 fusion layer, so a decoder layer without cross-attention)
    at 64 px; full dlip_small (55M params) takes ~90 s to export on 2 CPU cores."""
    data = get_config("dlip_small").to_dict()
    data["vision"].update(depth=2, image_size=64)
    data["text"].update(num_layers=2, fusion_layers=1)
    torch.manual_seed(0)
    model = dlip.BLIP(ModelConfig.from_dict(data))
    graphs = ["image_encoder", "itm", "decoder_next"]
    manifest = export.export_onnx(model, tmp_path, graphs=graphs, atol=ATOL)
    assert list(manifest["graphs"]) == graphs
    assert manifest["decoder"]["cross_attention_layers"] == [1]
    inputs = [i["name"] for i in manifest["graphs"]["decoder_next"]["inputs"]]
    assert inputs[-2:] == ["past_cross_1_key", "past_cross_1_value"]
    assert "past_cross_0_key" not in inputs
    for entry in manifest["graphs"].values():
        assert 0 <= max(entry["parity_max_abs_diff"].values()) <= ATOL
    (emb, feat) = _session(tmp_path / "image_encoder.onnx").run(
        None, {"pixels": np.zeros((5, 3, 64, 64), np.float32)}
    )
    assert emb.shape == (5, 17, 384) and feat.shape == (5, 256)


def test_corrupted_onnx_output_fails_the_export(tmp_path, monkeypatch):
    real = export.run_onnx

    def off_by_a_bit(path, feeds):
        outs = real(path, feeds)
        outs[-1] = outs[-1] + 1e-3  # image_feat drifts beyond atol
        return outs

    monkeypatch.setattr(export, "run_onnx", off_by_a_bit)
    model = dlip.create_model("test_tiny")
    with pytest.raises(export.ExportParityError, match=r"'image_encoder' output 'image_feat'"):
        export.export_onnx(model, tmp_path, graphs=["image_encoder"])
    assert not (tmp_path / "manifest.json").exists()


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    model = dlip.create_model("test_tiny", has_decoder=False)
    with pytest.raises(ValueError, match="atol must be >= 0"):
        export.export_onnx(model, tmp_path, atol=-1.0)
    with pytest.raises(ValueError, match=r"graphs \['decoder_next'\] not available"):
        export.export_onnx(model, tmp_path, graphs=["decoder_next"])
    assert main(["export", "onnx", "no_such_preset", "--out", str(tmp_path)]) == 2
    assert "not a saved model directory nor a preset" in capsys.readouterr().err
