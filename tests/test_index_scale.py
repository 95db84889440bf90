"""The image index at scale and with other tools: decoding in DataLoader workers gives the same
index, a FAISS index answers as the exact search does (IVF: recall measured), and the
clip-retrieval export reads back the way clip-retrieval's back end reads it."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from dlip.cli import main
from dlip.inference.ann import IVF_MIN_SIZE, build_faiss, faiss_topk
from dlip.inference.index import ImageIndex, build_index

faiss = pytest.importorskip("faiss")
pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The bundled photos, a few resized copies and a corrupt file: 10 files, 9 images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    photos = resources.files("dlip") / "assets/photos"
    for name in ("astronaut", "chelsea", "coffee"):
        src = Image.open(photos / f"{name}.jpg").convert("RGB")
        for i, size in enumerate((64, 48, 40)):
            src.resize((size, size + 8 * i)).save(root / f"{name}_{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_workers_build_the_same_index(pred, images, tmp_path):
    one = build_index(pred, images, tmp_path / "w0", batch_size=4, progress=False, workers=0)
    two = build_index(pred, images, tmp_path / "w2", batch_size=4, progress=False, workers=2)
    assert (one.count, one.skipped) == (two.count, two.skipped) == (9, {"not_an_image": 1})
    a, b = ImageIndex.load(tmp_path / "w0"), ImageIndex.load(tmp_path / "w2")
    assert a.paths == b.paths and torch.equal(a.features, b.features)


def test_faiss_index_answers_as_the_exact_search(pred, images, tmp_path):
    report = build_index(pred, images, tmp_path / "ix", progress=False, faiss="on")
    assert report.faiss and Path(report.faiss).name == "image.index"
    with_ann = ImageIndex.load(tmp_path / "ix")
    assert with_ann.ann is not None and with_ann.ann.ntotal == 9
    exact = ImageIndex(with_ann.paths, with_ann.features, with_ann.meta)  # no ann: all scored
    for query in ("a cat", "a cup of coffee", "an astronaut"):
        got = pred.search(query, with_ann, k=5)
        want = pred.search(query, exact, k=5)
        assert [h.path for h in got] == [h.path for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    build_index(pred, images, tmp_path / "ix", progress=False, faiss="off", resume=False)
    assert ImageIndex.load(tmp_path / "ix").ann is None  # a rebuild without it drops it


def test_ivf_recall_against_brute_force():
    """Clustered unit vectors (as image embeddings are): the IVF index finds >= 90% of the
    exact top-10 with its default nprobe."""
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    n = IVF_MIN_SIZE + 2000
    x = centers[torch.randint(0, 64, (n,), generator=g)] + 0.3 * torch.randn(n, 32, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)  # (N, 32)
    ann = build_faiss(x)
    assert isinstance(ann, faiss.IndexIVFFlat) and ann.nprobe > 1
    near = x[torch.randint(0, n, (50,), generator=g)] + 0.2 * torch.randn(50, 32, generator=g)
    queries = torch.nn.functional.normalize(near, dim=1)  # (50, 32) from the same distribution
    hits = 0
    for q in queries:
        exact = set((x @ q).topk(10).indices.tolist())
        hits += len(exact & set(faiss_topk(ann, q, 10)[1]))
    assert hits / (10 * len(queries)) >= 0.9


def test_clip_retrieval_export_reads_as_clip_back_reads_it(pred, images, model_dir, tmp_path):
    out = tmp_path / "clip"
    build = [
        "index",
        "build",
        str(images),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "ix"),
    ]
    assert main([*build, "--workers", "0", "--no-progress"]) == 0
    assert main(["index", "export", str(tmp_path / "ix"), "--out", str(out)]) == 0
    index = ImageIndex.load(tmp_path / "ix")
    # the embeddings folder, read in file order (as `clip-retrieval index` / autofaiss do)
    emb = np.concatenate([np.load(f) for f in sorted((out / "img_emb").glob("*.npy"))])
    assert emb.dtype == np.float32 and np.array_equal(emb, index.features.numpy())
    # clip_back.py: ParquetMetadataProvider concatenates metadata/*.parquet in name order;
    # load_index reads image.index; a search's ids index both
    metadata = pd.concat(pd.read_parquet(f) for f in sorted((out / "metadata").glob("*.parquet")))
    image_index = faiss.read_index(str(out / "image.index"))
    query = pred.embed_texts(["a cat"])[0].numpy()[None].astype("float32")
    distances, ids = image_index.search(query, 4)
    paths = [metadata[i : i + 1][["image_path"]].to_dict(orient="records")[0]["image_path"]
             for i in ids[0]]  # fmt: skip
    ours = pred.search("a cat", index, k=4)
    assert paths == [h.path for h in ours]
    assert np.allclose(distances[0], [h.score for h in ours], atol=1e-5)
    assert all(Path(p).is_file() for p in paths)
    shutil.rmtree(out)


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory) -> Path:
    """The same 10 files as two webdataset shards (key.png / key.jpg + key.txt per sample)."""
    import tarfile

    root = tmp_path_factory.mktemp("shards")
    files = sorted(images.iterdir())
    for s, part in enumerate((files[:5], files[5:])):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i, f in enumerate(part):
                key = f"{s:05d}{i:04d}"
                tar.add(f, arcname=f"{key}{f.suffix}")
                caption = tmp_path_factory.mktemp("c") / f"{key}.txt"
                caption.write_text(f"photo {f.stem}")
                tar.add(caption, arcname=f"{key}.txt")
    return root


def test_an_index_over_tar_shards_is_searched_and_shown_like_a_folder(
    pred, images, shards, tmp_path
):
    from dlip.inference.serve import _make_thumbnail

    report = build_index(pred, shards, tmp_path / "wds", batch_size=3, progress=False, workers=2)
    assert (report.count, report.skipped) == (9, {"not_an_image": 1})
    index = ImageIndex.load(tmp_path / "wds")
    assert index.paths[0] == "00000.tar/000000000.png" and len(index.paths) == 9
    folder = build_index(pred, images, tmp_path / "dir", progress=False)
    assert folder.count == 9
    same = ImageIndex.load(tmp_path / "dir")
    assert torch.allclose(torch.sort(index.features, 0)[0], torch.sort(same.features, 0)[0])
    hits = pred.search("a cat", index, k=3, rerank=3)  # the re-rank re-reads tar members
    assert len(hits) == 3 and all(h.itm is not None for h in hits) and not hits.skipped
    assert _make_thumbnail(Path(hits[0].path), 10**7)[:2] == b"\xff\xd8"  # the web app's JPEG
    again = build_index(pred, shards, tmp_path / "wds", progress=False)  # resumed, unchanged
    assert (again.resumed_chunks, again.refreshed) == (1, 0)
