"""Conversion and parity with the reference implementation (transformers' BLIP classes).

Small random HF BLIP models are saved with `save_pretrained`, converted by `dlip convert --from hf`
and must match HF's ITC similarities, ITM logits and LM logits to 1e-4 and its greedy / beam
caption ids exactly. Salesforce-format state dicts are written here from BLIP's key names.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import dlip
from dlip.cli import main
from dlip.models.convert import convert_salesforce
from dlip.models.generation import generate_ids
from dlip.models.io import CheckpointError
from dlip.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "a dog running on the beach",
    "two cats sleeping on a red sofa next to a window",
    "a man",
    "people walking down a busy street at night in the rain",
]
ENC_ID, DEC_ID, SEP_ID = 30523, 30522, 102


def _hf_config(vision_width: int = 48):
    """Tiny BLIP shapes; text width 32 (the VQA tests use vision_width=32: HF's answer decoder
    reads question states at the vision width)."""
    return transformers.BlipConfig(
        text_config=dict(
            vocab_size=30524,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            layer_norm_eps=1e-12,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * vision_width,
            image_size=32,
            patch_size=16,
            layer_norm_eps=1e-6,
        ),
        image_text_hidden_size=24,
    )


def _perturbed(model, scale: float):
    """HF initialises the ViT near zero; noise makes every path matter for parity."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _convert_hf(hf_model, tmp: Path, name: str):
    src, out = tmp / f"{name}_hf", tmp / f"{name}_dlip"
    hf_model.save_pretrained(str(src))
    assert main(["convert", str(src), "--from", "hf", "--out", str(out)]) == 0
    return dlip.load(out)


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture(scope="module")
def batch():
    return get_tokenizer()(TEXTS, max_length=16, padding="longest")


@pytest.fixture(scope="module")
def retrieval_pair(tmp_path_factory):
    hf = _perturbed(transformers.BlipForImageTextRetrieval(_hf_config()), 0.05)
    return hf, _convert_hf(hf, tmp_path_factory.mktemp("ret"), "retrieval")


@pytest.fixture(scope="module")
def caption_pair(tmp_path_factory):
    hf = _perturbed(transformers.BlipForConditionalGeneration(_hf_config()), 0.1)
    return hf, _convert_hf(hf, tmp_path_factory.mktemp("cap"), "caption")


def test_hf_config_is_read(retrieval_pair, caption_pair):
    _, ours = retrieval_pair
    c = ours.config
    assert (c.has_encoder, c.has_decoder) == (True, False)
    assert (c.vision.width, c.vision.depth, c.vision.num_heads, c.vision.mlp_ratio) == (
        48,
        2,
        4,
        2.0,
    )
    assert c.vision.layer_norm_eps == 1e-6 and c.text.num_heads == 4 and c.embed_dim == 24
    assert c.text.max_position_embeddings == 64
    assert (caption_pair[1].config.has_encoder, caption_pair[1].config.has_decoder) == (False, True)
    # HF stores no ITC temperature: the converted retrieval model's temp is marked unknown
    assert not c.temp_known and caption_pair[1].config.temp_known


@torch.no_grad()
def test_itc_similarities_match_hf(retrieval_pair, pixels, batch):
    hf, ours = retrieval_pair
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    sims = (
        ours.encode_image(pixels).feat @ ours.encode_text(ids, mask).feat.T
    )  # (3 images, 4 texts)
    assert sims.shape == (3, 4)
    torch.testing.assert_close(sims, ref, atol=1e-4, rtol=0)
    assert ref.std() > 0.01  # the comparison is not between constants


@torch.no_grad()
def test_itm_logits_match_hf(retrieval_pair, pixels, batch):
    hf, ours = retrieval_pair
    ids = batch["input_ids"][:3].clone()
    ids[:, 0] = ENC_ID  # [ENC] first, as BLIP's ITM training; HF uses ids as given
    mask = batch["attention_mask"][:3]
    ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    got = ours.itm_logits(ours.encode_image(pixels).tokens, ids, mask)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_lm_logits_match_hf(caption_pair, pixels, batch):
    hf, ours = caption_pair
    ids = batch["input_ids"][:3].clone()
    ids[:, 0] = DEC_ID
    mask = batch["attention_mask"][:3]
    ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    got = ours.lm_logits(ours.encode_image(pixels).tokens, ids, mask)
    real = mask.bool()  # padded query positions are irrelevant (and masked in every loss)
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)


def _hf_ids(hf, pixels, prompt: list[int], **kw) -> list[list[int]]:
    """HF generate -> id lists cut after the first [SEP] (HF pads with 0 or 102)."""
    inputs = torch.tensor([[*prompt, SEP_ID]] * pixels.shape[0])
    out = hf.generate(pixel_values=pixels, input_ids=inputs, **kw).tolist()
    rows = []
    for row in out:
        end = next((i for i in range(1, len(row)) if row[i] == SEP_ID), len(row) - 1)
        rows.append(row[: end + 1])
    return rows


# (num_beams, max_length, min_length, repetition_penalty, bias added to the [SEP] logit)
GEN_CASES = [
    (1, 20, 5, 1.0, 0.0),
    (3, 20, 5, 1.0, 0.0),
    (3, 12, 3, 1.0, 0.9),
    (1, 15, 3, 1.3, 1.2),
    (3, 20, 5, 1.1, 1.2),
    (4, 20, 1, 1.0, 1.2),
    (2, 16, 8, 1.0, 1.5),
    (5, 30, 2, 1.0, 0.6),
]


@torch.no_grad()
def test_generation_ids_match_hf(caption_pair, pixels):
    hf, ours = caption_pair
    tok = get_tokenizer()
    prompt = "a picture of"
    prompt_ids = [DEC_ID, *tok.encode(prompt)[1:-1]]
    bias_hf = hf.text_decoder.cls.predictions.bias
    bias_ours = ours.text_decoder.cls.predictions.bias
    lengths = set()
    for beams, max_len, min_len, penalty, boost in GEN_CASES:
        bias_hf[SEP_ID] += boost
        bias_ours[SEP_ID] += boost
        try:
            kw = dict(num_beams=beams, max_length=max_len, min_length=min_len)
            ref = _hf_ids(hf, pixels, prompt_ids, repetition_penalty=penalty, **kw)
            # transformers 5.x's rule: dlip's default "blip" reproduces 4.15 instead
            got = generate_ids(
                ours, pixels, prompt, beams, max_len, min_len, penalty, tok, beam_scoring="hf"
            )
        finally:
            bias_hf[SEP_ID] -= boost
            bias_ours[SEP_ID] -= boost
        assert got == ref, (beams, max_len, min_len, penalty, boost)
        lengths |= {(len(r), r[-1] == SEP_ID, len(r) == max_len) for r in got}
    # The cases cover both endings: EOS before max_length, and running out of length.
    assert any(eos and not full for _, eos, full in lengths)
    assert any(full and not eos for _, eos, full in lengths)


def test_roundtrip_dlip_hf_dlip(tmp_path, pixels, batch):
    torch.manual_seed(3)
    model = dlip.create_model("test_tiny").eval()  # pretraining form: encoder + tied decoder
    dlip.save(model, tmp_path / "ours")
    assert (
        main(["convert", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    )
    original = model.state_dict()
    for form in ("retrieval", "captioning"):
        hf_dir = tmp_path / "hf" / form
        assert main(["convert", str(hf_dir), "--from", "hf", "--out", str(tmp_path / form)]) == 0
        back = dlip.load(tmp_path / form).state_dict()
        assert back, form
        for key, tensor in back.items():
            if key != "temp":  # HF has no ITC temperature: it comes back as BLIP's 0.07
                assert torch.equal(tensor, original[key]), key
    # transformers itself loads the export with every weight in place and gives our numbers.
    hf = transformers.BlipForImageTextRetrieval.from_pretrained(str(tmp_path / "hf" / "retrieval"))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
        sims = model.encode_image(pixels).feat @ model.encode_text(ids, mask).feat.T
    torch.testing.assert_close(sims, ref.itm_score, atol=1e-5, rtol=0)


def test_export_refuses_non_blip_topology(tmp_path):
    cfg = dlip.get_config("test_tiny")
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "fusion_layers": 1}))
    dlip.save(dlip.create_model(cfg), tmp_path / "m")
    code = main(["convert", str(tmp_path / "m"), "--to", "hf", "--out", str(tmp_path / "x")])
    assert code == 2


# ----------------------------------------------------------------------------- Salesforce format
def _salesforce_state(layout: str, grid: int = 2) -> dict[str, torch.Tensor]:
    """A state dict with BLIP's own key names (models/blip*.py + med.py) at test_tiny sizes.

    Checked against the state_dict() of BLIP's own classes (salesforce/BLIP @056a169) built at
    these sizes: the key sets are identical for the pretrain, retrieval and caption layouts.
    "vqa" is BLIP_VQA's (models/blip_vqa.py): text_encoder a BertModel without pooler (so no
    ITC / ITM heads), text_decoder a BertLMHeadModel with its own weights, whose
    cross-attention reads text-width question states; its 151 keys and shapes are those of
    BLIP_VQA itself built at these sizes (same commit, ViT and med_config shrunk to test_tiny).
    """
    cfg = dlip.get_config("test_tiny")
    v, t = cfg.vision.width, cfg.text.hidden_size
    vi, ti = int(v * cfg.vision.mlp_ratio), cfg.text.intermediate_size
    e, vocab, npos = cfg.embed_dim, cfg.text.vocab_size, cfg.text.max_position_embeddings
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    vis = {
        "cls_token": r(1, 1, v),
        "pos_embed": r(1, grid * grid + 1, v),
        "patch_embed.proj.weight": r(v, 3, 16, 16),
        "patch_embed.proj.bias": r(v),
        "norm.weight": r(v),
        "norm.bias": r(v),
    }
    for i in range(cfg.vision.depth):
        for name, shape in {
            "norm1.weight": (v,),
            "norm1.bias": (v,),
            "attn.qkv.weight": (3 * v, v),
            "attn.qkv.bias": (3 * v,),
            "attn.proj.weight": (v, v),
            "attn.proj.bias": (v,),
            "norm2.weight": (v,),
            "norm2.bias": (v,),
            "mlp.fc1.weight": (vi, v),
            "mlp.fc1.bias": (vi,),
            "mlp.fc2.weight": (v, vi),
            "mlp.fc2.bias": (v,),
        }.items():
            vis[f"blocks.{i}.{name}"] = r(*shape)

    def attention(prefix: str, kv: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.self.query.weight": r(t, t),
            f"{prefix}.self.query.bias": r(t),
            f"{prefix}.self.key.weight": r(t, kv),
            f"{prefix}.self.key.bias": r(t),
            f"{prefix}.self.value.weight": r(t, kv),
            f"{prefix}.self.value.bias": r(t),
            f"{prefix}.output.dense.weight": r(t, t),
            f"{prefix}.output.dense.bias": r(t),
            f"{prefix}.output.LayerNorm.weight": r(t),
            f"{prefix}.output.LayerNorm.bias": r(t),
        }

    shared = {
        "embeddings.word_embeddings.weight": r(vocab, t),
        "embeddings.position_embeddings.weight": r(npos, t),
        "embeddings.LayerNorm.weight": r(t),
        "embeddings.LayerNorm.bias": r(t),
        "embeddings.position_ids": torch.arange(npos)[None],
    }
    enc_self, dec_self = {}, {}
    for i in range(cfg.text.num_layers):
        p = f"encoder.layer.{i}"
        shared.update(attention(f"{p}.crossattention", v))
        shared[f"{p}.intermediate.dense.weight"] = r(ti, t)
        shared[f"{p}.intermediate.dense.bias"] = r(ti)
        shared[f"{p}.output.dense.weight"] = r(t, ti)
        shared[f"{p}.output.dense.bias"] = r(t)
        shared[f"{p}.output.LayerNorm.weight"] = r(t)
        shared[f"{p}.output.LayerNorm.bias"] = r(t)
        enc_self.update(attention(f"{p}.attention", t))
        dec_self.update(attention(f"{p}.attention", t))

    state = {f"visual_encoder.{k}": x for k, x in vis.items()}
    if layout == "vqa":
        state |= {f"text_encoder.{k}": x for k, x in {**shared, **enc_self}.items()}
        dec_shared = {k: r(*x.shape) if x.is_floating_point() else x for k, x in shared.items()}
        for i in range(cfg.text.num_layers):
            dec_shared.update(attention(f"encoder.layer.{i}.crossattention", t))
        shared = dec_shared
    if layout in ("pretrain", "retrieval"):
        state |= {f"text_encoder.{k}": x for k, x in {**shared, **enc_self}.items()}
        state |= {"vision_proj.weight": r(e, v), "vision_proj.bias": r(e)}
        state |= {"text_proj.weight": r(e, t), "text_proj.bias": r(e)}
        state |= {"itm_head.weight": r(2, t), "itm_head.bias": r(2), "temp": torch.tensor(0.05)}
        # Training-only state that conversion must drop explicitly.
        momentum = {k: x.clone() for k, x in state.items() if k.startswith(("visual", "text_enc"))}
        state |= {
            k.replace("visual_encoder", "visual_encoder_m").replace(
                "text_encoder", "text_encoder_m"
            ): x
            for k, x in momentum.items()
        }
        state |= {"vision_proj_m.weight": r(e, v), "vision_proj_m.bias": r(e)}
        state |= {"text_proj_m.weight": r(e, t), "text_proj_m.bias": r(e)}
        state |= {"image_queue": r(e, 8), "text_queue": r(e, 8)}
    if layout == "retrieval":
        idx_queue = torch.full((1, 8), -100, dtype=torch.long)
        state |= {"idx_queue": idx_queue, "ptr_queue": torch.zeros(1, dtype=torch.long)}
    if layout == "pretrain":
        state |= {"queue_ptr": torch.zeros(1, dtype=torch.long)}
    if layout in ("pretrain", "caption", "vqa"):
        # BLIP ties decoder <-> encoder except self-attention; the file stores both copies.
        dec_shared = shared if layout != "caption" else {k: x.clone() for k, x in shared.items()}
        dec = {**dec_shared, **dec_self}
        state |= {f"text_decoder.bert.{k}": x for k, x in dec.items()}
        bias = r(vocab)
        state |= {
            "text_decoder.cls.predictions.bias": bias,
            "text_decoder.cls.predictions.decoder.bias": bias,
            "text_decoder.cls.predictions.decoder.weight": dec["embeddings.word_embeddings.weight"],
            "text_decoder.cls.predictions.transform.dense.weight": r(t, t),
            "text_decoder.cls.predictions.transform.dense.bias": r(t),
            "text_decoder.cls.predictions.transform.LayerNorm.weight": r(t),
            "text_decoder.cls.predictions.transform.LayerNorm.bias": r(t),
        }
    return state


def _save_pth(state: dict, path: Path) -> Path:
    torch.save({"model": state, "epoch": 3}, path)
    return path


@pytest.mark.parametrize(
    "layout,grid,forms",
    [("pretrain", 2, (True, True)), ("retrieval", 4, (True, False)), ("caption", 4, (False, True))],
)
def test_salesforce_layouts_convert_strictly(tmp_path, layout, grid, forms):
    state = _salesforce_state(layout, grid)
    src = _save_pth(state, tmp_path / f"model_{layout}.pth")
    out = tmp_path / "out"
    assert (
        main(
            ["convert", str(src), "--from", "salesforce", "--arch", "test_tiny", "--out", str(out)]
        )
        == 0
    )
    model = dlip.load(out)
    assert (model.config.has_encoder, model.config.has_decoder) == forms
    assert model.config.vision.image_size == grid * 16  # read from pos_embed (224 vs 384 in BLIP)
    ours = model.state_dict()
    skipped = ("_m.", "queue", "ptr", "position_ids", "decoder.bias")
    for key, tensor in state.items():
        if key.startswith(("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m")):
            continue
        if any(s in key for s in skipped) and key not in ours:
            continue
        assert torch.equal(ours[key], tensor), key
    assert not any(k.endswith("_m") or "_m." in k for k in ours)


def test_salesforce_renamed_key_is_named(tmp_path):
    state = _salesforce_state("retrieval", 2)
    good = "text_encoder.encoder.layer.1.crossattention.self.key.weight"
    bad = good.replace("crossattention", "crossattn")
    state[bad] = state.pop(good)
    src = _save_pth(state, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError) as err:
        convert_salesforce(src, "test_tiny")
    assert bad in str(err.value)
    state[good] = state.pop(bad)
    del state["itm_head.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['itm_head.bias'\]"):
        convert_salesforce(_save_pth(state, tmp_path / "missing.pth"), "test_tiny")


def test_salesforce_untied_decoder_copy_is_an_error(tmp_path):
    state = _salesforce_state("pretrain", 2)
    key = "text_decoder.bert.encoder.layer.0.intermediate.dense.weight"
    state[key] = state[key] + 1.0  # no longer the encoder's tensor
    with pytest.raises(CheckpointError, match="should be tied"):
        convert_salesforce(_save_pth(state, tmp_path / "untied.pth"), "test_tiny")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/dlip_pickle_executed"),))


def test_salesforce_loading_never_unpickles_code(tmp_path):
    marker = Path("/tmp/dlip_pickle_executed")
    marker.unlink(missing_ok=True)
    src = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Payload()}, src)  # a pickle that would run code on load
    with pytest.raises(pickle.UnpicklingError):
        convert_salesforce(src, "test_tiny")
    assert not marker.exists()


def test_salesforce_image_size_resize(tmp_path):
    src = _save_pth(_salesforce_state("retrieval", 2), tmp_path / "m.pth")
    model = convert_salesforce(src, "test_tiny", image_size=64)
    assert model.config.vision.image_size == 64
    assert model.visual_encoder.pos_embed.shape == (1, 17, 32)
    assert model.encode_image(torch.randn(1, 3, 64, 64)).feat.shape == (1, 16)


def test_hf_vision_eps_note_and_override(tmp_path, capsys):
    cfg = _hf_config()
    cfg.vision_config.layer_norm_eps = 1e-5  # what HF hub BLIP configs say
    src = tmp_path / "hf"
    transformers.BlipForImageTextRetrieval(cfg).save_pretrained(str(src))
    assert main(["convert", str(src), "--from", "hf", "--out", str(tmp_path / "a")]) == 0
    assert "vision layer_norm_eps=1e-05 as the HF config says" in capsys.readouterr().out
    assert dlip.load(tmp_path / "a").config.vision.layer_norm_eps == 1e-5
    args = [
        "convert",
        str(src),
        "--from",
        "hf",
        "--vision-ln-eps",
        "1e-6",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(args) == 0
    model = dlip.load(tmp_path / "b")
    assert model.config.vision.layer_norm_eps == 1e-6
    assert model.visual_encoder.blocks[0].norm1.eps == 1e-6


def test_loading_an_hf_directory_says_to_convert(retrieval_pair, tmp_path):
    retrieval_pair[0].save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"is a transformers 'blip' model.*--from hf"):
        dlip.load(tmp_path / "hf")
