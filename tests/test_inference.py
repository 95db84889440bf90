"""Predictor, ImageIndex / build_index and the inference CLI on a tiny 32 px model."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dlip
from dlip.cli import main
from dlip.data.synthetic import synthesize
from dlip.inference.index import FEATURES_FILE, INDEX_JSON, ImageIndex, build_index
from dlip.inference.predictor import BadImage, Predictor
from dlip.losses.itm import with_first_token
from dlip.transforms import eval_transform, load_image

PHOTOS = sorted((Path(dlip.__file__).parent / "assets" / "photos").glob("*.jpg"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    synthesize(root, 12, image_size=32)
    (root / "images" / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:300])  # truncated
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def _pixels(model, paths) -> torch.Tensor:
    tf = eval_transform(model.config)
    return torch.stack([tf(load_image(p)) for p in paths])


# ------------------------------------------------------------------------------- inputs
def test_every_input_type_gives_the_same_embedding(pred):
    path = PHOTOS[0]
    im = Image.open(path).convert("RGB")
    inputs = [str(path), path, im, np.asarray(im), path.read_bytes()]
    feats = pred.embed_images(inputs)
    assert feats.shape == (5, pred.model.config.embed_dim)
    torch.testing.assert_close(feats, feats[:1].expand(5, -1))
    grey = np.asarray(im.convert("L"))  # HxW
    torch.testing.assert_close(pred.embed_images(grey), pred.embed_images(im.convert("L")))


def test_embeddings_match_the_model(pred):
    model = pred.model
    with torch.inference_mode():
        want = model.encode_image(_pixels(model, PHOTOS)).feat
    got = pred.embed_images([str(p) for p in PHOTOS], batch_size=2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(PHOTOS)))
    texts = ["A cat, lying on a blanket!", "an astronaut", "a cup of coffee on a table"]
    ids, mask = pred.tokenize(texts)
    assert ids[0, 0] == pred.tokenizer.cls_token_id
    with torch.inference_mode():
        want_t = model.encode_text(ids, mask).feat
    got_t = pred.embed_texts(texts, batch_size=2)
    torch.testing.assert_close(got_t, want_t)
    torch.testing.assert_close(got_t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(pred.embed_texts(texts[0]), got_t[:1])


def test_caption_beam_and_sampling(pred):
    paths = [str(p) for p in PHOTOS[:2]]
    caps = pred.caption(paths, num_beams=2, max_length=12)
    assert caps == pred.caption(paths, num_beams=2, max_length=12, batch_size=1)
    want = pred.model.generate(_pixels(pred.model, paths), num_beams=2, max_length=12)
    assert caps == want
    assert all(isinstance(c, str) and c for c in caps)
    s1 = pred.caption(paths, sample=True, seed=7, max_length=12)
    assert s1 == pred.caption(paths, sample=True, seed=7, max_length=12)
    assert s1 != caps  # random weights: a sample almost surely leaves the beam's path
    with pytest.raises(ValueError, match="top_p"):
        pred.caption(paths, sample=True, top_p=0.0)


def test_itm_scores_are_softmax_of_itm_logits(pred):
    texts = ["a cat on a blanket", "an astronaut in a suit"]
    probs = pred.itm_scores(str(PHOTOS[1]), texts)  # one image, many texts
    assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()
    ids, mask = pred.tokenize(texts)
    ids = with_first_token(ids, pred.tokenizer.enc_token_id)
    with torch.inference_mode():
        tokens = pred.model.encode_image(_pixels(pred.model, [PHOTOS[1]])).tokens
        logits = pred.model.itm_logits(tokens.expand(2, -1, -1), ids, mask)
    torch.testing.assert_close(probs, logits.softmax(-1)[:, 1])
    zipped = pred.itm_scores([str(PHOTOS[1])] * 2, texts, batch_size=1)
    torch.testing.assert_close(zipped, probs)
    with pytest.raises(ValueError, match="3 images vs 2 texts"):
        pred.itm_scores([str(p) for p in PHOTOS], texts)


def test_bad_images_name_the_input(pred, tmp_path, monkeypatch):
    good = PHOTOS[0].read_bytes()
    with pytest.raises(BadImage, match=r"image 1: truncated"):
        pred.embed_images([good, good[: len(good) // 3]])
    with pytest.raises(BadImage, match=r"image 2: not_an_image"):
        pred.caption([good, good, b"<html>not an image</html>"])
    missing = tmp_path / "nope.jpg"
    with pytest.raises(BadImage, match=r"image 0 \(.*nope.jpg\): missing_file"):
        pred.embed_images([missing])
    small = Predictor(pred.model, max_pixels=1000)
    with pytest.raises(BadImage, match=r"image 0.*too_large") as err:
        small.embed_images([PHOTOS[0]])
    assert isinstance(err.value, ValueError) and err.value.reason == "too_large"
    with pytest.raises(BadImage, match="too_large"):
        small.embed_images(np.zeros((100, 100, 3), np.uint8))
    # PIL's own bomb check (a warning between 1x and 2x its limit) is a BadImage, not a warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)
    with pytest.raises(BadImage, match="too_large"):
        pred.embed_images([good])  # 384x255 = 97,920 pixels


# ------------------------------------------------------------------------------- index
def test_build_index_resume_and_search(pred, image_dir, tmp_path):
    fresh = build_index(pred, image_dir, tmp_path / "fresh", batch_size=4, chunk_size=5)
    assert fresh.complete and fresh.count == 12 and fresh.chunks_total == 3
    assert fresh.skipped == {"truncated": 1} and list(fresh.bad_files) == ["images/broken.jpg"]
    index = ImageIndex.load(tmp_path / "fresh")
    assert len(index) == 12 and index.meta["skipped"] == {"truncated": 1}
    assert index.meta["embed_dim"] == pred.model.config.embed_dim

    out = tmp_path / "resumed"  # an interrupted run: one chunk, then a rerun
    part = build_index(pred, image_dir, out, batch_size=4, chunk_size=5, max_chunks=1)
    assert not part.complete and not (out / INDEX_JSON).exists()
    rest = build_index(pred, image_dir, out, batch_size=4, chunk_size=5, progress=False)
    assert rest.complete and rest.resumed_chunks == 1
    resumed = ImageIndex.load(out)
    assert resumed.paths == index.paths
    torch.testing.assert_close(resumed.features, index.features, rtol=0, atol=0)
    (out / INDEX_JSON).unlink()
    (out / FEATURES_FILE).unlink()
    again = build_index(pred, image_dir, out, batch_size=4, chunk_size=5)
    assert again.resumed_chunks == 3 and ImageIndex.load(out).paths == index.paths
    with pytest.raises(ValueError, match="chunk_size"):
        build_index(pred, image_dir, out, batch_size=4, chunk_size=6)

    hits = pred.search("a red circle", index, k=4)
    assert len(hits) == 4 and all(h.itm is None and h.score == h.itc for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    q = pred.embed_texts("a red circle")[0]
    assert hits[0].itc == pytest.approx(float((index.features @ q).max()), abs=1e-6)
    reranked = pred.search("a red circle", index, k=3, rerank=6)
    assert len(reranked) == 3 and all(h.itm is not None for h in reranked)
    for h in reranked:
        assert h.score == pytest.approx(h.itm + h.itc)
    assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    assert {h.path for h in reranked} <= {h.path for h in pred.search("a red circle", index, 6)}


def test_search_with_another_model_errors(pred, image_dir, tmp_path):
    build_index(pred, image_dir, tmp_path / "idx", chunk_size=100, progress=False)
    index = ImageIndex.load(tmp_path / "idx")
    torch.manual_seed(5)
    other = Predictor(dlip.create_model("test_tiny"))  # same name, other weights
    with pytest.raises(ValueError, match="rebuild the index"):
        other.search("a dog", index)
    cfg = pred.model.config.replace(embed_dim=8)
    with pytest.raises(ValueError, match="embed_dim 8"):
        Predictor(dlip.BLIP(cfg)).search("a dog", index)


# ------------------------------------------------------------------------------- CLI
def test_cli_caption_itm_index_search(model_dir, image_dir, tmp_path, capsys):
    photo = str(PHOTOS[0])
    assert main(["caption", photo, "--model", str(model_dir), "--beams", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["image"] == photo and isinstance(rows[0]["caption"], str)

    assert main(["itm", photo, "a cat", "--model", str(model_dir), "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["match_probability"] <= 1.0

    out = tmp_path / "feats.npy"
    assert main(["embed", "--text", "a", "b", "--model", str(model_dir), "--out", str(out)]) == 0
    assert np.load(out).shape == (2, 16)
    capsys.readouterr()

    idx = tmp_path / "index"
    argv = ["index", "build", str(image_dir), "--model", str(model_dir), "--out", str(idx)]
    assert main([*argv, "--batch-size", "5", "--no-progress"]) == 0
    assert "indexed 12 images" in capsys.readouterr().out
    assert main(["search", str(idx), "a red circle", "-k", "3", "--rerank", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["itm"] is not None for h in hits)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    assert main(["caption", str(bad), "--model", str(model_dir)]) == 2
    assert "not_an_image" in capsys.readouterr().err


def test_index_files_are_plain(pred, image_dir, tmp_path):
    """index.json holds what search and the CLI need; a moved copy still loads."""
    build_index(pred, image_dir, tmp_path / "a", progress=False)
    meta = json.loads((tmp_path / "a" / INDEX_JSON).read_text())
    assert meta["count"] == 12 and meta["model"] == pred.spec and meta["image_size"] == 32
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert ImageIndex.load(tmp_path / "b").features.shape == (12, 16)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert pred.embed_images(buf.getvalue()).shape == (1, 16)
