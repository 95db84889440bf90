"""Inference API: `Predictor` (caption, embed, ITM, search, VQA; the on-disk index is
dlip.inference.index).

Inputs are paths, PIL images, HxWx3 / HxW uint8 numpy arrays or encoded bytes; a bad one raises
`BadImage` (a ValueError) naming its index and the reason (`dlip.data.common.REASONS` names).
Images over `max_pixels` are refused from the header, before any pixel is decoded, and PIL's
own decompression-bomb warning / error becomes BadImage too.

Thread safety: every public Predictor method holds one re-entrant lock for its whole call, so a
Predictor may be shared by threads (calls run one at a time; run several Predictors, one per
device, for parallelism). Outputs are float32 CPU tensors.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dlip.images import ImageError, decode_rgb
from dlip.models.blip import BLIP

if TYPE_CHECKING:
    from dlip.inference.index import ImageIndex
    from dlip.inference.ort import OnnxBLIP

ImageInput = str | os.PathLike | Image.Image | np.ndarray | bytes
DEFAULT_MAX_PIXELS = 64_000_000  # far above any photo, far below what exhausts memory
TEXT_LENGTH = 35  # BLIP's eval text length
MAX_WORDS = 30  # pre_caption word limit for queries (BLIP's retrieval)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_warned_presets: set[str] = set()


class BadImage(ValueError):
    """An image input that cannot be used; `index` is its position in the call, `reason` one of
    dlip.data.common.REASONS (not_an_image, truncated, too_large, empty_image, missing_file,
    unreadable_file)."""

    def __init__(self, index: int | None, reason: str, detail: str, name: str = "") -> None:
        where = f"image {index}" if index is not None else "image"
        if name:
            where += f" ({name})"
        super().__init__(f"{where}: {reason}: {detail}")
        self.index, self.reason, self.detail = index, reason, detail


# ------------------------------------------------------------------------------- decoding
def _check_size(w: int, h: int, max_pixels: int) -> tuple[str, str] | None:
    if w * h == 0:
        return "empty_image", f"{w}x{h}"
    if w * h > max_pixels:
        return "too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}"
    return None


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> upright, fully decoded RGB (`dlip.images.decode_rgb`); raises
    BadImage(index=None) on any problem."""
    try:
        return decode_rgb(data, max_pixels)
    except ImageError as err:
        raise BadImage(None, err.reason, err.detail) from None


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    if arr.dtype != np.uint8:
        raise BadImage(None, "not_an_image", f"numpy array of dtype {arr.dtype}, expected uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise BadImage(None, "not_an_image", f"array shape {arr.shape}, expected HxW or HxWx3")
    problem = _check_size(arr.shape[1], arr.shape[0], max_pixels)
    if problem:
        raise BadImage(None, *problem)
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def to_pil(item: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One ImageInput -> RGB PIL image; BadImage (index None) when unusable."""
    if isinstance(item, (str, os.PathLike)):
        from dlip.data.common import BadSample, decode_image

        try:
            return decode_image(Path(item), max_pixels)
        except BadSample as err:
            raise BadImage(None, err.reason, err.detail, str(item)) from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(item), max_pixels)
    if isinstance(item, Image.Image):
        problem = _check_size(item.width, item.height, max_pixels)
        if problem:
            raise BadImage(None, *problem)
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, np.ndarray):
        return _from_array(item, max_pixels)
    raise BadImage(None, "not_an_image", f"unsupported input type {type(item).__name__}")


def _as_list(items: Any, kind: type | tuple[type, ...]) -> list:
    """A single input -> [input]; a sequence stays a list (a str / bytes is one item)."""
    if isinstance(items, kind) or (isinstance(items, np.ndarray) and items.ndim in (2, 3)):
        return [items]
    return list(items)


# ------------------------------------------------------------------------------- predictor
@dataclass
class SearchHit:
    path: str
    score: float  # itm + itc when re-ranked, else itc
    itc: float  # cosine similarity
    itm: float | None  # raw ITM positive logit (re-ranked hits only)


class SearchResults(list[SearchHit]):
    """`Predictor.search`'s hits (a plain list to callers), plus `skipped`: the index paths that
    re-ranking could not read, each with its BadImage reason."""

    def __init__(self, hits: list[SearchHit], skipped: dict[str, str] | None = None) -> None:
        super().__init__(hits)
        self.skipped: dict[str, str] = skipped or {}


class Predictor:
    """A BLIP model ready for inference; see the module docstring for inputs and threading."""

    def __init__(
        self,
        model: BLIP | OnnxBLIP,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        spec: str | None = None,
        quantize: str | None = None,
    ) -> None:
        from dlip.tokenizer import get_tokenizer
        from dlip.transforms import eval_transform

        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.quantize = quantize
        if not isinstance(model, BLIP):  # an ONNX Runtime model (dlip.inference.ort)
            _check_onnx_use(model, self.device, self.dtype, quantize)
            self.fingerprint, self.model = model.fingerprint, model
        else:
            self.fingerprint = model_fingerprint(model)  # before the dtype cast
            self.model = model.to(self.device, self.dtype).eval()
        if quantize is not None:
            from dlip.inference.quant import quantize_model

            self.model = quantize_model(self.model, quantize, self.device, self.dtype)
        self.tokenizer = get_tokenizer()
        self.transform = eval_transform(model.config)
        self.max_pixels = max_pixels
        self.spec = spec or model.config.name
        self._lock = threading.RLock()

    @classmethod
    def load(
        cls,
        path_or_preset: str,
        device: str = "auto",
        dtype: str | torch.dtype = "float32",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        quantize: str | None = None,
    ) -> Predictor:
        """A saved model directory (strict load), a `dlip export onnx` directory (run by ONNX
        Runtime on the CPU, dlip.inference.ort) or a preset name (random weights, warns).
        `quantize="int8"`: dynamic int8 linear layers on the CPU (dlip.inference.quant)."""
        from dlip.inference.ort import OnnxBLIP, is_onnx_dir
        from dlip.models.io import is_preset, resolve

        if is_onnx_dir(path_or_preset):
            dev = torch.device("cpu" if device == "auto" else device)
            spec = str(Path(path_or_preset).resolve())
            return cls(OnnxBLIP(path_or_preset), dev, dtype, max_pixels, spec, quantize)
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device != "auto":
            dev = torch.device(device)
        model = resolve(path_or_preset)  # neither a directory nor a preset: FileNotFoundError
        spec = path_or_preset if is_preset(path_or_preset) else str(Path(path_or_preset).resolve())
        if is_preset(path_or_preset) and path_or_preset not in _warned_presets:
            _warned_presets.add(path_or_preset)
            warnings.warn(
                f"preset {path_or_preset!r} has random weights: outputs are meaningless "
                "(pass a saved model directory for real predictions)",
                stacklevel=2,
            )
        return cls(model, dev, dtype, max_pixels, spec, quantize)

    # ----------------------------------------------------------------------------- helpers
    @contextmanager
    def _run(self) -> Iterator[None]:
        low = self.dtype != torch.float32
        with (
            self._lock,
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.dtype, enabled=low),
        ):
            yield

    def pixels(self, images: Sequence[Any], offset: int = 0) -> Tensor:
        """Inputs -> (B, 3, S, S) normalised pixels on the device; BadImage names the index."""
        out = []
        for i, item in enumerate(images):
            try:
                im = to_pil(item, self.max_pixels)
            except BadImage as err:
                name = str(item) if isinstance(item, (str, os.PathLike)) else ""
                raise BadImage(offset + i, err.reason, err.detail, name) from None
            out.append(self.transform(im))
        return torch.stack(out).to(self.device, self.dtype)

    def _batches(self, images: Any, batch_size: int) -> Iterator[Tensor]:
        items = _as_list(images, (str, os.PathLike, Image.Image, bytes))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from dlip.progress import bar

        for start in bar(range(0, len(items), batch_size), desc="images", unit="batch"):
            yield self.pixels(items[start : start + batch_size], offset=start)

    def tokenize(self, texts: Sequence[str], first: int | None = None) -> tuple[Tensor, Tensor]:
        """pre_caption'd texts -> (B, T) ids ([CLS] first, or `first`) and mask on the device."""
        from dlip.tokenizer import pre_caption

        enc = self.tokenizer([pre_caption(t, MAX_WORDS) for t in texts], max_length=TEXT_LENGTH)
        ids = enc["input_ids"]
        if first is not None:
            ids = ids.clone()
            ids[:, 0] = first
        return ids.to(self.device), enc["attention_mask"].to(self.device)

    # ----------------------------------------------------------------------------- tasks
    def caption(
        self,
        images: Any,
        num_beams: int = 3,
        max_length: int = 20,
        min_length: int = 5,
        prompt: str | None = None,
        repetition_penalty: float = 1.0,
        sample: bool = False,
        top_p: float = 0.9,
        seed: int | None = None,
        batch_size: int = 16,
        temperature: float = 1.0,
        beam_scoring: str = "blip",
    ) -> list[str]:
        """Beam search (greedy at num_beams=1), or nucleus sampling when `sample` (one torch
        Generator seeded with `seed` for the whole call: reproducible for a fixed batch_size).
        `beam_scoring`: "blip" (transformers 4.15, as BLIP ran it) or "hf" (transformers 5.x);
        see `dlip.models.generation`."""
        from dlip.models.generation import generate_captions

        prompt = self.model.config.prompt if prompt is None else prompt
        if sample and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        gen = None
        if sample:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        out: list[str] = []
        with self._run():
            for pixels in self._batches(images, batch_size):
                if sample:
                    out += sample_captions(
                        self.model, pixels, prompt, max_length, min_length,
                        repetition_penalty, top_p, temperature, gen, self.tokenizer,
                    )  # fmt: skip
                else:
                    out += generate_captions(
                        self.model, pixels, prompt, num_beams, max_length, min_length,
                        repetition_penalty, self.tokenizer, beam_scoring,
                    )  # fmt: skip
        return out

    def vqa(
        self,
        images: Any,
        questions: str | Sequence[str],
        answers: Sequence[str] | None = None,
        k_test: int = 128,
        num_beams: int = 3,
        max_length: int = 10,
        min_length: int = 1,
        beam_scoring: str = "blip",
        batch_size: int = 16,
    ) -> list[str]:
        """One answer per (image, question) pair, zipped; one image with many questions (or
        many images with one question) broadcasts. With `answers` (e.g. BLIP's answer list)
        the answer is ranked from them, else generated (`BLIP.answer`). VQA models only."""
        if not self.model.config.vqa:
            raise ValueError(f"model {self.spec!r} is not a VQA model (config vqa=false)")
        imgs = _as_list(images, (str, os.PathLike, Image.Image, bytes))
        qs = _as_list(questions, str)
        n = max(len(imgs), len(qs))
        if len(imgs) not in (1, n) or len(qs) not in (1, n) or n == 0:
            raise ValueError(f"vqa: {len(imgs)} images vs {len(qs)} questions")
        if any(not isinstance(q, str) or not q.strip() for q in qs):
            raise ValueError("vqa: every question must be a non-empty string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[str] = []
        with self._run():
            one = self.pixels(imgs) if len(imgs) == 1 else None  # decoded once, shared
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                if one is None:
                    pixels = self.pixels(imgs[start:stop], offset=start)
                else:
                    pixels = one.expand(stop - start, -1, -1, -1)
                chunk = qs * (stop - start) if len(qs) == 1 else qs[start:stop]
                out += self.model.answer(
                    pixels, chunk, None if answers is None else list(answers), k_test,
                    num_beams, max_length, min_length, beam_scoring, self.tokenizer,
                )  # fmt: skip
        return out

    def embed_images(self, images: Any, batch_size: int = 32) -> Tensor:
        """(N, E) L2-normalised ITC image features, float32 on CPU."""
        feats = [torch.zeros(0, self.model.config.embed_dim)]
        with self._run():
            for pixels in self._batches(images, batch_size):
                feats.append(self.model.encode_image(pixels).feat.float().cpu())
        return torch.cat(feats)

    def embed_texts(self, texts: str | Sequence[str], batch_size: int = 128) -> Tensor:
        """(N, E) L2-normalised ITC text features (pre_caption'd, 35 tokens), float32 CPU."""
        texts = _as_list(texts, str)
        feats = [torch.zeros(0, self.model.config.embed_dim)]
        with self._run():
            for start in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[start : start + batch_size])
                feats.append(self.model.encode_text(ids, mask).feat.float().cpu())
        return torch.cat(feats)

    def itm_scores(self, images: Any, texts: str | Sequence[str], batch_size: int = 32) -> Tensor:
        """(N,) match probability softmax(ITM logits)[:, 1] of zipped pairs; one image with many
        texts or many images with one text broadcast."""
        imgs = _as_list(images, (str, os.PathLike, Image.Image, bytes))
        txts = _as_list(texts, str)
        n = max(len(imgs), len(txts))
        if len(imgs) not in (1, n) or len(txts) not in (1, n):
            raise ValueError(f"itm_scores: {len(imgs)} images vs {len(txts)} texts")
        out = []
        with self._run():
            tokens = None
            for start in range(0, n, batch_size):
                rows = range(start, min(start + batch_size, n))
                if len(imgs) > 1 or tokens is None:
                    chunk = imgs if len(imgs) == 1 else imgs[rows.start : rows.stop]
                    tokens = self.model.encode_image(self.pixels(chunk, start)).tokens
                t = txts if len(txts) == 1 else txts[rows.start : rows.stop]
                ids, mask = self.tokenize(t, first=self.tokenizer.enc_token_id)
                b = len(rows)
                img_tok = tokens.expand(b, -1, -1) if tokens.shape[0] == 1 else tokens
                ids, mask = ids.expand(b, -1), mask.expand(b, -1)
                logits = self.model.itm_logits(img_tok, ids, mask).float()  # (b, 2)
                out.append(logits.softmax(-1)[:, 1].cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def search(
        self, query: str, index: ImageIndex, k: int = 10, rerank: int | None = None
    ) -> SearchResults:
        """ITC top-k; with `rerank`, the top `rerank` images are re-scored by ITM positive logit
        + cosine (BLIP's rule, images re-read from their paths) and ranked above the rest.

        An image among those `rerank` that can no longer be read (deleted, or replaced by a
        non-image since indexing) is left out of the results rather than kept with its ITC
        score alone, which is not comparable with the re-ranked scores; the next ITC hits fill
        its place. Such files are listed in the result's `skipped` (index path -> reason).
        """
        from dlip.eval.retrieval import itm_pair_scores

        index.check_model(self)
        if k < 1 or (rerank is not None and rerank < 1):
            raise ValueError(f"k and rerank must be >= 1 (got k={k}, rerank={rerank})")
        # k past the re-ranked head: hits that stand in for the files re-ranking must skip
        scores, rows = index.topk(self.embed_texts([query])[0], k + (rerank or 0))  # FAISS or all
        hits = [SearchHit(index.path(i), s, s, None) for s, i in zip(scores, rows, strict=True)]
        if not rerank or not hits:
            return SearchResults(hits[:k])
        head, pixels, skipped = [], [], {}
        with self._run():
            for hit in hits[:rerank]:
                try:
                    pixels.append(self.transform(to_pil(hit.path, self.max_pixels)))
                    head.append(hit)
                except BadImage as err:  # changed since indexing: skip it, not the search
                    skipped[hit.path] = err.reason
            if head:
                image = self.model.encode_image(torch.stack(pixels).to(self.device, self.dtype))
                ids, mask = self.tokenize([query], first=self.tokenizer.enc_token_id)
                pairs = torch.arange(len(head))
                itm = itm_pair_scores(self.model, image.tokens, ids, mask, pairs, pairs * 0)
                for hit, logit in zip(head, itm.tolist(), strict=True):
                    hit.itm, hit.score = logit, logit + hit.itc
        head.sort(key=lambda h: -h.score)
        return SearchResults((head + hits[rerank:])[:k], skipped)


def _check_onnx_use(model: Any, device: torch.device, dtype: torch.dtype, quantize: str | None):
    """An ONNX Runtime model runs float32 graphs on the CPU; int8 is chosen at export."""
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(
            f"{model.directory}: the ONNX Runtime backend runs on the CPU in float32 "
            f"(got device {device}, dtype {dtype})"
        )
    if quantize is not None:
        raise ValueError(
            f"{model.directory}: quantize={quantize!r} applies to PyTorch models; for ONNX "
            "export with `dlip export onnx --quantize int8` (or quantize_onnx_dir)"
        )


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is CUDA only; use float32 (or bfloat16, slower) on CPU")
    if device.type == "cpu" and dtype == torch.bfloat16:
        warnings.warn("bfloat16 on CPU is usually slower than float32", stacklevel=3)
    return dtype


def model_fingerprint(model: BLIP) -> str:
    """A short hash of the projection weights: tells two checkpoints apart in an index."""
    h = hashlib.sha1(model.config.name.encode())
    for name in ("vision_proj", "text_proj", "visual_encoder.cls_token"):
        try:
            t = model.get_submodule(name).weight if "proj" in name else model.get_parameter(name)
        except AttributeError:
            continue
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_captions(
    model: BLIP,
    pixels: Tensor,
    prompt: str,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    top_p: float,
    temperature: float,
    gen: torch.Generator | None,
    tokenizer,
) -> list[str]:
    """Nucleus sampling over the KV-cached decoder, lengths as beam search (prompt counted);
    the prompt is stripped from the returned text."""
    from dlip.models.generation import decode_captions, nucleus, prompt_ids, token_by_token

    eos = tokenizer.sep_token_id
    seqs = prompt_ids(tokenizer, prompt, pixels.shape[0], pixels.device)  # (B, L0)
    if max_length <= seqs.shape[1]:
        raise ValueError(f"max_length {max_length} leaves no room after the prompt")
    rows = token_by_token(
        model, model.encode_image(pixels).tokens, seqs, max_length, min_length,
        repetition_penalty, eos, nucleus(top_p, temperature, gen),
    )  # fmt: skip
    return decode_captions(tokenizer, rows, prompt)
