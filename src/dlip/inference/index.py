"""The on-disk image index of `dlip index build` / `dlip search`: features + paths.

`build_index(predictor, image_dir, out)` embeds every image under a directory in chunks written
atomically (OUT/chunks/NNNNN.safetensors + OUT/progress.json), so an interrupted build resumes
after its last complete chunk; the final form is OUT/index.json + OUT/features.safetensors.
Bad images are skipped and counted. Each chunk records every file's signature (size and
mtime_ns, taken before the file is read); a rerun re-embeds the files whose signature changed
(replaced in place) and keeps the other embeddings.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlip.fileio import atomic_write_text
from dlip.inference.predictor import IMAGE_EXTENSIONS, BadImage, Predictor, to_pil

INDEX_JSON, FEATURES_FILE = "index.json", "features.safetensors"  # the final index
REBUILD = "rebuild the index: dlip index build IMAGE_DIR --model M --out DIR --no-resume"
CHUNK_DIR, PROGRESS_JSON = "chunks", "progress.json"  # a build in progress


@dataclass
class ImageIndex:
    """Normalised image features with their files: DIR/index.json + DIR/features.safetensors."""

    paths: list[str]  # relative to `root` (absolute when root is "")
    features: Tensor  # (N, E) float32
    meta: dict[str, Any] = field(default_factory=dict)
    ann: Any = None  # a FAISS index over `features` (DIR/image.index), searched when present

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return str(Path(self.meta.get("root", "")) / self.paths[i])

    @classmethod
    def load(cls, path: str | Path) -> ImageIndex:
        from dlip.fileio import load_safetensors

        path = Path(path)
        if not (path / INDEX_JSON).is_file():
            raise FileNotFoundError(f"{path / INDEX_JSON} not found (build it: dlip index build)")
        meta = _read_meta(path / INDEX_JSON)
        features = load_safetensors(path / FEATURES_FILE).get("features")
        if features is None or features.dim() != 2:
            raise ValueError(f"{path / FEATURES_FILE}: no (N, E) 'features' tensor; {REBUILD}")
        paths = meta.pop("paths")
        if features.shape != (len(paths), meta["embed_dim"]):
            raise ValueError(
                f"{path}: features {tuple(features.shape)} vs {len(paths)} paths, "
                f"embed_dim {meta['embed_dim']}"
            )
        return cls(paths, features.float(), meta, _load_ann(path, len(paths)))

    def topk(self, query: Tensor, k: int) -> tuple[list[float], list[int]]:
        """Cosine scores and rows of the `k` images nearest the (E,) normalised `query`:
        FAISS when the index has one, else exact (all N scored)."""
        k = min(k, len(self))
        if self.ann is not None:
            from dlip.inference.ann import faiss_topk

            return faiss_topk(self.ann, query, k)
        sims = self.features @ query.float()  # (N,)
        top = sims.topk(k)
        return top.values.tolist(), top.indices.tolist()

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (FEATURES_FILE + ".tmp")
        save_file({"features": self.features.contiguous()}, str(tmp))
        tmp.replace(path / FEATURES_FILE)
        meta = {**self.meta, "count": len(self.paths), "paths": self.paths}
        atomic_write_text(path / INDEX_JSON, json.dumps(meta, indent=1) + "\n")

    def check_model(self, predictor: Predictor) -> None:
        """ValueError unless `predictor` runs the model this index was built with."""
        model = predictor.model.config
        want = (self.meta.get("model_name"), self.meta.get("embed_dim"))
        got = (model.name, model.embed_dim)
        if want != got or self.meta.get("fingerprint") != predictor.fingerprint:
            raise ValueError(
                f"index built with model {want[0]!r} (embed_dim {want[1]}, weights "
                f"{self.meta.get('fingerprint')}, from {self.meta.get('model')}) but the "
                f"predictor runs {got[0]!r} (embed_dim {got[1]}, weights "
                f"{predictor.fingerprint}): rebuild the index or load its model"
            )


def _load_ann(path: Path, count: int) -> Any:
    """DIR/image.index if there is one; without faiss installed the exact search stands in."""
    from dlip.inference.ann import FAISS_FILE, read_faiss

    if not (path / FAISS_FILE).is_file():
        return None
    try:
        ann = read_faiss(path / FAISS_FILE)
    except ImportError as err:
        warnings.warn(f"{path / FAISS_FILE} not used, searching exactly: {err}", stacklevel=3)
        return None
    if ann.ntotal != count:
        raise ValueError(f"{path / FAISS_FILE} holds {ann.ntotal} vectors, the index {count}")
    return ann


@dataclass
class IndexReport:
    out: str
    count: int  # images in the index (so far, when incomplete)
    skipped: dict[str, int]  # bad files by reason
    bad_files: dict[str, str]  # relative path -> reason
    chunks_done: int
    chunks_total: int
    resumed_chunks: int  # chunks found complete from an earlier run
    refreshed: int = 0  # files of those chunks re-embedded: changed since (or no signature)
    faiss: str | None = None  # the FAISS index written beside it (--faiss)

    @property
    def complete(self) -> bool:
        return self.chunks_done == self.chunks_total


def check_out_dir(out: str | Path) -> Path:
    """`out` as an index directory to write: absent or a directory (a file there is an error,
    before any model work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is there; an index is a directory")
    return out


def list_images(image_dir: str | Path) -> list[str]:
    """Image files under `image_dir` (recursive, sorted), as posix paths relative to it; a
    folder of tar shards (webdataset, img2dataset) lists each sample's image as SHARD.tar/NAME
    (`dlip.data.members`)."""
    from dlip.data.members import list_members

    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    if any(p.suffix == ".tar" and p.is_file() for p in root.iterdir()):
        return list_members(root)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


Chunk = tuple[Tensor, list[str], dict[str, str], dict[str, Any]]  # feats, kept, bad, signatures


def _signature(path: Path) -> list[int] | None:
    """What tells a file replaced in place from the one indexed: [size, mtime_ns]."""
    from dlip.data.members import stat

    try:
        st = stat(path)  # of the tar shard for a member: a rewritten shard is re-embedded
    except OSError:
        return None  # gone: its read fails and names the reason
    return [st.st_size, st.st_mtime_ns]


class _Files(torch.utils.data.Dataset):
    """(name, signature, pixels or None, reason or None) per file: read and transformed in
    DataLoader workers, so decoding overlaps the model's forwards."""

    def __init__(self, predictor: Predictor, root: Path, names: list[str]) -> None:
        self.root, self.names = root, names
        self.transform, self.max_pixels = predictor.transform, predictor.max_pixels

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[str, Any, Tensor | None, str | None]:
        name = self.names[i]
        # stat before reading: a file replaced meanwhile is then seen as changed next run
        sig = _signature(self.root / name)
        try:
            return name, sig, self.transform(to_pil(self.root / name, self.max_pixels)), None
        except BadImage as err:
            return name, sig, None, err.reason


def _as_list(items: list) -> list:
    return items


def _embed_chunk(
    predictor: Predictor, root: Path, names: list[str], batch_size: int, tick: Callable,
    workers: int = 0,
) -> Chunk:  # fmt: skip
    """Features of the readable files among `names`; the others are returned with a reason."""
    from torch.utils.data import DataLoader

    feats = [torch.zeros(0, predictor.model.config.embed_dim)]
    kept: list[str] = []
    bad: dict[str, str] = {}
    sigs: dict[str, Any] = {}
    files = _Files(predictor, root, names)
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=_as_list)
    for batch in loader:
        pixels = []
        for name, sig, px, reason in batch:
            sigs[name] = sig
            if px is None:
                bad[name] = reason
            else:
                pixels.append(px)
                kept.append(name)
        if pixels:
            with predictor._run():
                px = torch.stack(pixels).to(predictor.device, predictor.dtype)
                feats.append(predictor.model.encode_image(px).feat.float().cpu())  # (B, E)
        tick(len(batch))
    return torch.cat(feats), kept, bad, sigs


def _write_chunk(path: Path, feats: Tensor, kept: list[str], bad: dict, sigs: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"paths": json.dumps(kept), "bad": json.dumps(bad), "sigs": json.dumps(sigs)}
    save_file({"features": feats.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a killed build never leaves a half chunk


def _read_chunk(path: Path) -> Chunk:
    """A chunk's parts; its signatures are {} when written before they were recorded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            kept, bad = json.loads(meta["paths"]), json.loads(meta["bad"])
            return f.get_tensor("features"), kept, bad, json.loads(meta.get("sigs", "{}"))
    except Exception as err:  # SafetensorError, a missing key, bad JSON metadata
        raise ValueError(
            f"{path}: unreadable index chunk ({err!r}); rebuild with --no-resume"
        ) from None


def _read_meta(path: Path) -> dict[str, Any]:
    """index.json, checked for what ImageIndex needs (paths, embed_dim)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {REBUILD}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: a JSON {type(meta).__name__}, not an object; {REBUILD}")
    paths, dim = meta.get("paths"), meta.get("embed_dim")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{path}: 'paths' is not a list of file names; {REBUILD}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{path}: 'embed_dim' is not an int; {REBUILD}")
    return meta


def _refresh_chunk(
    predictor: Predictor, root: Path, path: Path, names: list[str], batch_size: int
) -> int:
    """Re-embed the files of a complete chunk whose signature changed (all of them when it has
    none); the others keep their features. Returns how many were re-embedded."""
    feats, kept, bad, sigs = _read_chunk(path)
    stale = [n for n in names if n not in sigs or sigs[n] != _signature(root / n)]
    if not stale:
        return 0
    new_feats, new_kept, new_bad, new_sigs = _embed_chunk(
        predictor, root, stale, batch_size, lambda _n: None
    )
    rows = {n: feats[i] for i, n in enumerate(kept)} | dict(zip(new_kept, new_feats, strict=True))
    kept = [n for n in names if n in rows and (n in new_kept or n not in new_sigs)]
    reasons = {n: r for n, r in bad.items() if n not in new_sigs} | new_bad
    bad = {n: reasons[n] for n in names if n in reasons}  # listing order, as a fresh build
    out = torch.stack([rows[n] for n in kept]) if kept else feats[:0]
    _write_chunk(path, out, kept, bad, {**sigs, **new_sigs})
    return len(stale)


def _build_state(predictor: Predictor, root: Path, files: list[str], chunk_size: int) -> dict:
    """What a resumed build must share with the run that wrote the chunks."""
    listing = hashlib.sha1("\n".join(files).encode()).hexdigest()
    return {
        "root": str(root),
        "files_sha1": listing,
        "n_files": len(files),
        "chunk_size": chunk_size,
        "model_name": predictor.model.config.name,
        "fingerprint": predictor.fingerprint,
    }


def _resume_point(out: Path, state: dict, resume: bool) -> int:
    """Chunks already complete in `out` (0 without resume); ValueError if they are foreign."""
    progress = out / PROGRESS_JSON
    if not resume or not progress.is_file():
        for old in (out / CHUNK_DIR).glob("*.safetensors"):
            old.unlink()
        return 0
    prev = json.loads(progress.read_text(encoding="utf-8"))
    diff = [k for k in state if prev.get(k) != state[k]]
    if diff:
        raise ValueError(
            f"{out} holds a partial index of other inputs ({', '.join(diff)} differ): "
            "use another --out or resume=False (--no-resume) to start over"
        )
    done = int(prev["done"])
    while done and not (out / CHUNK_DIR / f"{done - 1:05d}.safetensors").is_file():
        done -= 1  # a chunk removed by hand: redo it
    return done


def build_index(
    predictor: Predictor,
    image_dir: str | Path,
    out: str | Path,
    batch_size: int = 32,
    resume: bool = True,
    progress: bool = True,
    chunk_size: int = 1024,
    max_chunks: int | None = None,
    workers: int = 0,
    faiss: str = "auto",
    faiss_min_size: int = 100_000,
) -> IndexReport:
    """Embed every image under `image_dir` into an ImageIndex at `out`, resumably.

    Images go in chunks of `chunk_size` files, each written atomically to out/chunks/NNNNN +
    out/progress.json; a rerun continues after the last complete chunk. Unreadable files are
    skipped and counted. `max_chunks` stops after that many new chunks (incremental builds);
    index.json + features.safetensors are written once every chunk is done.

    A rerun over the same files also checks the chunks it resumes: a file whose size or
    mtime_ns differs from those recorded when it was embedded (replaced in place) is embedded
    again, the others keep their features (`IndexReport.refreshed` counts them; index.json's
    "change_check" names what is compared). Chunks from before signatures were recorded are
    embedded again in full. Added or removed files change the listing: start over (resume=False).

    `workers`: DataLoader processes that decode images. `faiss`: "on" writes DIR/image.index
    (dlip.inference.ann) for any size, "auto" once there are `faiss_min_size` images and faiss
    is installed, "off" never.
    """
    from tqdm import tqdm

    from dlip.progress import shown

    if batch_size < 1 or chunk_size < 1 or workers < 0:
        raise ValueError(f"batch_size, chunk_size >= 1, workers >= 0 ({batch_size}, "
                         f"{chunk_size}, {workers})")  # fmt: skip
    if faiss not in ("auto", "on", "off"):
        raise ValueError(f"faiss must be auto, on or off, got {faiss!r}")
    if faiss == "on":
        from dlip.inference.ann import faiss_module

        faiss_module()  # not installed: an error now, not after the embedding
    check_out_dir(out)
    root, out = Path(image_dir).resolve(), Path(out)
    files = list_images(root)
    state = _build_state(predictor, root, files, chunk_size)
    done = resumed = _resume_point(out, state, resume)
    total = -(-len(files) // chunk_size)
    refreshed = 0
    for c in range(done):  # files replaced in place since their chunk was written
        names = files[c * chunk_size : (c + 1) * chunk_size]
        chunk = out / CHUNK_DIR / f"{c:05d}.safetensors"
        refreshed += _refresh_chunk(predictor, root, chunk, names, batch_size)
    start = min(done * chunk_size, len(files))
    bar = tqdm(total=len(files), initial=start, disable=not (progress and shown()), unit="image")
    with bar:
        while done < total and (max_chunks is None or done - resumed < max_chunks):
            names = files[done * chunk_size : (done + 1) * chunk_size]
            chunk = _embed_chunk(predictor, root, names, batch_size, bar.update, workers)
            _write_chunk(out / CHUNK_DIR / f"{done:05d}.safetensors", *chunk)
            done += 1
            atomic_write_text(out / PROGRESS_JSON, json.dumps({**state, "done": done}, indent=1))
    feats, paths, bad = [torch.zeros(0, predictor.model.config.embed_dim)], [], {}
    for c in range(done):
        f, p, b, _ = _read_chunk(out / CHUNK_DIR / f"{c:05d}.safetensors")
        feats.append(f)
        paths += p
        bad.update(b)
    skipped = dict(sorted(Counter(bad.values()).items()))
    if done == total:
        meta = {
            "model": predictor.spec,
            "model_name": predictor.model.config.name,
            "embed_dim": predictor.model.config.embed_dim,
            "image_size": predictor.model.config.vision.image_size,
            "fingerprint": predictor.fingerprint,
            "root": str(root),
            "skipped": skipped,
            "bad_files": bad,
            "change_check": "size+mtime_ns",  # a rebuild re-embeds files these changed for
        }
        index = ImageIndex(paths, torch.cat(feats), meta)
        index.save(out)
        written = _write_ann(index, out, faiss, faiss_min_size)
    else:
        written = None
    return IndexReport(str(out), len(paths), skipped, bad, done, total, resumed, refreshed, written)


def _write_ann(index: ImageIndex, out: Path, faiss: str, min_size: int) -> str | None:
    """DIR/image.index as `faiss` asks; a stale one of an earlier build is removed."""
    from dlip.inference.ann import FAISS_FILE, build_faiss, faiss_module, write_faiss

    (out / FAISS_FILE).unlink(missing_ok=True)
    if faiss == "off" or (faiss == "auto" and len(index) < min_size):
        return None
    try:
        faiss_module()
    except ImportError as err:  # auto: the exact search serves, slower
        print(f"note: {len(index)} images, no FAISS index written: {err}")
        return None
    return str(write_faiss(build_faiss(index.features), out / FAISS_FILE))
