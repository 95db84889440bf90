"""ONNX Runtime as a Predictor backend: `Predictor.load(onnx_dir)` runs the graphs that
`dlip export onnx` wrote (dlip.inference.onnx) instead of PyTorch modules.

`OnnxBLIP` offers the part of BLIP's interface that Predictor and the generation loop use
(`config`, `encode_image`, `encode_text`, `itm_logits`, `step_decoder`), each call one
onnxruntime session run on CPU tensors. Captioning reuses dlip.models.generation's beam search
and greedy / nucleus loops unchanged: `step_decoder` returns a stepper that runs
`decoder_first` once per image (its cross-attention keys / values are computed there, once, and
repeated for the beams) and `decoder_next` for every later token over the self-attention cache.

Outputs match the PyTorch model within the export's parity tolerance (fp32 graphs) or within the
int8 tolerances of docs/benchmarks.md (graphs written with `--quantize int8`). VQA exports are
refused here (their graphs serve other runtimes; dlip runs VQA in PyTorch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dlip.models.config import ModelConfig
from dlip.models.generation import prompt_group

FORMAT = "dlip-onnx/1"
MANIFEST = "manifest.json"  # beside the graphs dlip.inference.onnx writes


@dataclass
class OrtOutput:
    tokens: Tensor | None  # (B, N, Dv) image tokens (image_encoder) / None for text
    feat: Tensor | None  # (B, E) L2-normalised ITC features


def is_onnx_dir(path: str | Path) -> bool:
    """True when `path` is a directory holding an export's manifest."""
    return (Path(path) / MANIFEST).is_file()


def cpu_session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session, quiet below errors; `threads` intra-op threads (one
    inter-op) when given, else onnxruntime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxBLIP:
    """A `dlip export onnx` directory run by onnxruntime on the CPU, with BLIP's call names."""

    training = False

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        root = Path(directory)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{root / MANIFEST}: not a readable export manifest: {err}") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{root / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}"
            )
        self.config = ModelConfig.from_dict(manifest["model"], source=str(root / MANIFEST))
        if self.config.vqa:
            raise ValueError(
                f"{root}: a VQA export; Predictor's ONNX backend serves captioning, retrieval "
                "and ITM graphs only (load the PyTorch model for VQA)"
            )
        self.directory = root
        self.quantize: str | None = manifest.get("quantize")
        self.fingerprint: str = manifest.get("fingerprint") or f"onnx:{root.resolve()}"
        self.threads = threads or torch.get_num_threads()
        graphs = manifest.get("graphs", {})
        missing = [g for g in self._needed() if g not in graphs]
        if missing:
            raise ValueError(f"{root}: graphs {missing} missing (exported: {sorted(graphs)})")
        self.sessions = {
            name: cpu_session(root / entry["file"], self.threads) for name, entry in graphs.items()
        }
        self.cross_layers: list[int] = (manifest.get("decoder") or {}).get(
            "cross_attention_layers", []
        )

    def _needed(self) -> list[str]:
        out = ["image_encoder"]
        if self.config.has_itc:
            out += ["text_encoder", "itm"]
        if self.config.has_decoder:
            out += ["decoder_first", "decoder_next"]
        return out

    # BLIP's nn.Module calls that Predictor and generation make; nothing to do here
    def eval(self) -> OnnxBLIP:
        return self

    def train(self, mode: bool = True) -> OnnxBLIP:
        if mode:
            raise ValueError("an ONNX Runtime model is inference only")
        return self

    def _run(self, graph: str, feeds: dict[str, Tensor]) -> list[np.ndarray]:
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
        return self.sessions[graph].run(None, arrays)

    def encode_image(self, pixels: Tensor) -> OrtOutput:
        """(B, 3, S, S) float32 pixels -> tokens (B, N, Dv) and ITC feature (B, E)."""
        out = self._run("image_encoder", {"pixels": pixels.float()})
        feat = torch.from_numpy(out[1]) if len(out) > 1 else None
        return OrtOutput(torch.from_numpy(out[0]), feat)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> OrtOutput:
        """(B, T) ids ([CLS] first) and mask -> the (B, E) ITC feature (no token states)."""
        out = self._run("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})
        return OrtOutput(None, torch.from_numpy(out[0]))

    def itm_logits(self, image_tokens: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, 2) match logits of image tokens with ids ([ENC] first)."""
        feeds = {"image_embeds": image_tokens.float(), "input_ids": input_ids}
        return torch.from_numpy(self._run("itm", feeds | {"attention_mask": mask})[0])

    def step_decoder(self, image_tokens: Tensor, source_mask: Tensor | None) -> OrtDecoder:
        if source_mask is not None:
            raise ValueError("the ONNX decoder graphs take no cross-attention mask")
        return OrtDecoder(self, image_tokens)


class OrtDecoder:
    """dlip.models.generation's stepper over `decoder_first` / `decoder_next`: `step` gives the
    last position's logits, `reorder` follows the beams."""

    def __init__(self, model: OnnxBLIP, image_tokens: Tensor) -> None:
        self.model = model
        self.image = image_tokens  # (B, N, Dv)
        self.num_layers = model.config.text.num_layers
        self.self_kv: list[np.ndarray] = []  # k, v per layer: (rows, H, P, d)
        self.cross_kv: list[np.ndarray] = []  # k, v per cross layer: (rows, H, N, d)

    def step(self, ids: Tensor, total_len: int) -> Tensor:
        """(rows, T) new ids -> (rows, V) float32 logits of the last position."""
        if not self.cross_kv:
            return self._first(ids)
        feeds = {
            "input_ids": ids.numpy(),
            "attention_mask": np.ones((ids.shape[0], total_len), dtype=np.int64),
        }
        for i in range(self.num_layers):
            feeds[f"past_self_{i}_key"] = self.self_kv[2 * i]
            feeds[f"past_self_{i}_value"] = self.self_kv[2 * i + 1]
        for j, layer in enumerate(self.model.cross_layers):
            feeds[f"past_cross_{layer}_key"] = self.cross_kv[2 * j]
            feeds[f"past_cross_{layer}_value"] = self.cross_kv[2 * j + 1]
        out = self.model.sessions["decoder_next"].run(None, feeds)
        self.self_kv = out[1:]
        return torch.from_numpy(out[0][:, -1])

    def _first(self, ids: Tensor) -> Tensor:
        """The prompt step: one decoder_first row per image, repeated for its g beams when the
        g rows of each image hold the same prompt (beam search's first step), else one per row."""
        b, rows = self.image.shape[0], ids.shape[0]
        if rows % b:
            raise ValueError(f"{rows} decoder rows for {b} images: not a multiple")
        g = prompt_group(ids, self.image)
        first = ids[::g]  # (rows / g, L0): one row per image when its beams share the prompt
        image = self.image.repeat_interleave(first.shape[0] // b, dim=0)
        feeds = {"image_embeds": image.float(), "input_ids": first}
        feeds["attention_mask"] = torch.ones_like(first)
        out = self.model._run("decoder_first", feeds)
        n_self = 2 * self.num_layers
        self.self_kv = [np.repeat(x, g, axis=0) for x in out[1 : 1 + n_self]]
        self.cross_kv = [np.repeat(x, g, axis=0) for x in out[1 + n_self :]]
        self.image = None
        return torch.from_numpy(np.repeat(out[0][:, -1], g, axis=0))  # (rows, V)

    def reorder(self, rows: Tensor) -> None:
        """Beam bookkeeping: row r of the cache becomes old row rows[r] (self-attention only;
        the beams of one image share its cross-attention keys / values)."""
        index = rows.numpy()
        self.self_kv = [x[index] for x in self.self_kv]
