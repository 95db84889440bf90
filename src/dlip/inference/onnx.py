"""ONNX export of a BLIP model: one graph per serving task, checked against PyTorch on export.

Graphs (each present only when the model has the parts it needs):

- `image_encoder`: pixels (B, 3, S, S) -> image_embeds (B, N, Dv), image_feat (B, E)
- `text_encoder`: input_ids, attention_mask (B, T) -> text_feat (B, E), text_cls (B, Dt)
- `itm`: image_embeds, input_ids ([ENC] first), attention_mask -> itm_logits (B, 2)
- `decoder_first`: image_embeds, input_ids ([DEC] + prompt), attention_mask -> logits (B, T, V)
  plus present self-attention K/V and the image cross-attention K/V of every layer
- `decoder_next`: new input_ids (B, T), attention_mask (B, P+T), past self K/V (P tokens) and
  the cross K/V from `decoder_first` -> logits (B, T, V) and present self K/V (P+T tokens)

We use the dynamo exporter (`torch.onnx.export(dynamo=True)`, via torch.export): the legacy
TorchScript tracer bakes the KV-cache length and the causal-mask size into constants (tested:
wrong logits at another batch/length). Every graph is run in onnxruntime on random inputs at
two batch sizes and lengths other than the export example; a max abs difference above `atol`
fails the export with an `ExportParityError` naming the graph, output and difference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dlip.fileio import write_json
from dlip.models.blip import BLIP
from dlip.models.text import KVCache
from dlip.tokenizer import Tokenizer

MANIFEST = "manifest.json"
GRAPHS = ("image_encoder", "text_encoder", "itm", "decoder_first", "decoder_next")
# Export example sizes: >= 2 and pairwise distinct so torch.export neither specialises a dim
# to 0/1 nor assumes two dims equal; parity then runs at other sizes (batch 1 included).
EXAMPLE = {"batch": 2, "seq": 7, "past": 6, "new": 3}
PARITY_RUNS = (
    {"batch": 1, "seq": 5, "past": 5, "new": 1},
    {"batch": 3, "seq": 9, "past": 8, "new": 2},
)
INT_INPUTS = ("input_ids", "attention_mask")
Shape = list[int | str]


class ExportParityError(ValueError):
    """onnxruntime disagrees with PyTorch beyond atol on one output of one graph."""


# ----------------------------------------------------------------------------- wrappers
class ImageEncoder(nn.Module):
    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        out = self.model.encode_image(pixels)
        return (out.tokens,) if out.feat is None else (out.tokens, out.feat)


class TextEncoder(nn.Module):
    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.encode_text(input_ids, attention_mask)
        return out.feat, out.tokens[:, 0]  # (B, E), (B, Dt)


class ITMScorer(nn.Module):
    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.itm_logits(image_embeds, input_ids, attention_mask)  # (B, 2)


class DecoderFirst(nn.Module):
    """Prompt step: logits, then self K/V per layer, then cross K/V per cross layer."""

    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.text.num_layers

    def forward(
        self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, ...]:
        cache = KVCache.empty(self.num_layers)
        states = self.model.decode(image_embeds, input_ids, attention_mask, cache=cache).tokens
        out = [self.model.text_decoder.cls(states)]  # (B, T, V)
        for kv in cache.self_kv + [kv for kv in cache.cross_kv if kv is not None]:
            out += [kv[0], kv[1]]  # (B, H, T or N, d)
        return tuple(out)


class DecoderNext(nn.Module):
    """Later steps: past self K/V (P tokens) + cross K/V in, logits + self K/V (P+T) out."""

    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.text.num_layers
        self.cross_layers = cross_layers(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple:
        n = self.num_layers
        cache = KVCache.empty(n)
        cache.self_kv = [(past[2 * i], past[2 * i + 1]) for i in range(n)]
        for j, layer in enumerate(self.cross_layers):
            cache.cross_kv[layer] = (past[2 * n + 2 * j], past[2 * n + 2 * j + 1])
        states = self.model.decode(None, input_ids, attention_mask, cache=cache).tokens
        out = [self.model.text_decoder.cls(states)]
        for k, v in cache.self_kv:
            out += [k, v]
        return tuple(out)


def cross_layers(model: BLIP) -> list[int]:
    t = model.config.text
    return [i for i in range(t.num_layers) if t.has_cross_attention(i)]


# ----------------------------------------------------------------------------- graph specs
@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: dict[str, Shape]  # name -> symbolic shape (str = dynamic axis)
    outputs: dict[str, Shape]
    make_inputs: Callable[[dict[str, int], torch.Generator], tuple[Tensor, ...]]


def _kv_shapes(
    prefix: str, layers: Sequence[int], kind: str, length: int | str, heads: int, head_dim: int
) -> dict[str, Shape]:
    """e.g. past_self_0_key: (batch, H, past_seq, d), in layer order, key before value."""
    return {
        f"{prefix}_{kind}_{i}_{kv}": ["batch", heads, length, head_dim]
        for i in layers
        for kv in ("key", "value")
    }


def _text_inputs(
    model: BLIP, b: int, t: int, first_id: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random ids (B, T) starting with `first_id`; row 0 full, other rows padded at the end."""
    vocab = model.config.text.vocab_size
    ids = torch.randint(1, vocab, (b, t), generator=gen)
    ids[:, 0] = first_id
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).long()  # (B, T)
    return ids.masked_fill(mask == 0, 0), mask


def _image_embeds(model: BLIP, b: int, gen: torch.Generator) -> Tensor:
    v = model.config.vision
    return torch.randn(b, v.num_tokens, v.width, generator=gen)  # (B, N, Dv)


def graph_specs(model: BLIP) -> list[GraphSpec]:
    """Every graph this model supports, with names, symbolic shapes and input makers."""
    cfg = model.config
    v, t = cfg.vision, cfg.text
    s, n, dv, dt, e = v.image_size, v.num_tokens, v.width, t.hidden_size, cfg.embed_dim
    ids: Shape = ["batch", "seq"]
    specs = []
    image_out: dict[str, Shape] = {"image_embeds": ["batch", n, dv]}
    if cfg.has_itc:
        image_out["image_feat"] = ["batch", e]
    specs.append(
        GraphSpec(
            "image_encoder",
            ImageEncoder(model),
            {"pixels": ["batch", 3, s, s]},
            image_out,
            lambda d, g: (torch.randn(d["batch"], 3, s, s, generator=g),),
        )
    )
    if cfg.has_itc:
        specs.append(
            GraphSpec(
                "text_encoder",
                TextEncoder(model),
                {"input_ids": ids, "attention_mask": ids},
                {"text_feat": ["batch", e], "text_cls": ["batch", dt]},
                lambda d, g: _text_inputs(model, d["batch"], d["seq"], Tokenizer.cls_token_id, g),
            )
        )
        specs.append(
            GraphSpec(
                "itm",
                ITMScorer(model),
                {"image_embeds": ["batch", n, dv], "input_ids": ids, "attention_mask": ids},
                {"itm_logits": ["batch", 2]},
                lambda d, g: (
                    _image_embeds(model, d["batch"], g),
                    *_text_inputs(model, d["batch"], d["seq"], Tokenizer.enc_token_id, g),
                ),
            )
        )
    if cfg.has_decoder:
        specs += _decoder_specs(model)
    return specs


def _decoder_specs(model: BLIP) -> list[GraphSpec]:
    cfg = model.config
    t = cfg.text
    n, dv, h, d = cfg.vision.num_tokens, cfg.vision.width, t.num_heads, t.hidden_size // t.num_heads
    layers, cross = range(t.num_layers), cross_layers(model)
    logits: Shape = ["batch", "seq", t.vocab_size]
    ids: dict[str, Shape] = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    first_in = {"image_embeds": ["batch", n, dv], **ids}
    first_out = {"logits": logits, **_kv_shapes("present", layers, "self", "seq", h, d)}
    first_out |= _kv_shapes("present", cross, "cross", n, h, d)
    next_in = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "past_seq+seq"]}
    next_in |= _kv_shapes("past", layers, "self", "past_seq", h, d)
    next_in |= _kv_shapes("past", cross, "cross", n, h, d)
    next_out = {"logits": logits, **_kv_shapes("present", layers, "self", "past_seq+seq", h, d)}
    first = DecoderFirst(model)

    def first_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[Tensor, ...]:
        image = _image_embeds(model, sizes["batch"], gen)
        text = _text_inputs(model, sizes["batch"], sizes["seq"], Tokenizer.dec_token_id, gen)
        return (image, *text)

    def next_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[Tensor, ...]:
        b = sizes["batch"]
        image = _image_embeds(model, b, gen)
        prompt = _text_inputs(model, b, sizes["past"], Tokenizer.dec_token_id, gen)[0]
        with torch.no_grad():
            outs = first(image, prompt, torch.ones_like(prompt))
        new_ids = torch.randint(1, t.vocab_size, (b, sizes["new"]), generator=gen)
        mask = torch.ones(b, sizes["past"] + sizes["new"], dtype=torch.long)
        return (new_ids, mask, *outs[1:])

    return [
        GraphSpec("decoder_first", first, first_in, first_out, first_inputs),
        GraphSpec("decoder_next", DecoderNext(model), next_in, next_out, next_inputs),
    ]


# ----------------------------------------------------------------------------- export + parity
def _dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export dynamic shapes: Dim.AUTO on every symbolic axis of every input."""
    from torch.export import Dim

    per_input = [
        {axis: Dim.AUTO for axis, size in enumerate(shape) if isinstance(size, str)}
        for shape in spec.inputs.values()
    ]
    if isinstance(spec.module, DecoderNext):  # forward(input_ids, attention_mask, *past)
        return (per_input[0], per_input[1], tuple(per_input[2:]))
    return tuple(per_input)


def export_graph(spec: GraphSpec, path: Path, opset: int) -> int:
    """torch.onnx.export (dynamo) one wrapper, name its symbolic axes as in the spec, save;
    returns the graph's ai.onnx opset."""
    import onnx

    example = spec.make_inputs(EXAMPLE, torch.Generator().manual_seed(1234))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module,
            example,
            dynamo=True,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_shapes=_dynamic_shapes(spec),
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    _name_axes(proto.graph.input, spec.inputs, spec.name)
    _name_axes(proto.graph.output, spec.outputs, spec.name)
    # Protobuf caps a file at 2 GB: large models keep their weights in PATH.data beside it.
    weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    large = weight_bytes > 1_500_000_000
    onnx.save(proto, str(path), save_as_external_data=large, location=f"{path.name}.data")
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _name_axes(values, shapes: dict[str, Shape], graph: str) -> None:
    """Rename the exporter's symbols (s25, ...) on graph inputs/outputs to the spec's names;
    a static axis that differs from the spec is an export error."""
    found = [v.name for v in values]
    if found != list(shapes):
        raise RuntimeError(f"ONNX graph {graph}: names {found} differ from {list(shapes)}")
    for value in values:
        dims = value.type.tensor_type.shape.dim
        want = shapes[value.name]
        if len(dims) != len(want):
            raise RuntimeError(f"ONNX graph {graph}: {value.name} has rank {len(dims)}")
        for dim, size in zip(dims, want, strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            elif dim.HasField("dim_value") and dim.dim_value != size:
                raise RuntimeError(
                    f"ONNX graph {graph}: {value.name} has a fixed {dim.dim_value} where "
                    f"{size} was expected"
                )
            else:
                dim.dim_value = size


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One onnxruntime CPU run; outputs in graph order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check_parity(spec: GraphSpec, path: Path, atol: float, seed: int = 0) -> dict[str, float]:
    """Max abs diff per output over PARITY_RUNS; raises ExportParityError above `atol`."""
    gen = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(spec.outputs, 0.0)
    for sizes in PARITY_RUNS:
        inputs = spec.make_inputs(sizes, gen)
        with torch.no_grad():
            expected = spec.module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {name: x.numpy() for name, x in zip(spec.inputs, inputs, strict=True)}
        got = run_onnx(path, feeds)
        for name, ref, out in zip(spec.outputs, expected, got, strict=True):
            if tuple(out.shape) != tuple(ref.shape):
                raise ExportParityError(
                    f"ONNX graph {spec.name!r} output {name!r}: shape {tuple(out.shape)} vs "
                    f"PyTorch {tuple(ref.shape)} at {sizes}"
                )
            diff = float(np.max(np.abs(out.astype(np.float64) - ref.double().numpy())))
            if not diff <= atol:  # NaN fails too
                raise ExportParityError(
                    f"ONNX graph {spec.name!r} output {name!r}: max abs diff {diff:.3g} "
                    f"> atol {atol:g} vs PyTorch at {sizes}"
                )
            worst[name] = max(worst[name], diff)
    return worst


# ----------------------------------------------------------------------------- driver
def export_onnx(
    model: BLIP,
    out_dir: str | Path,
    opset: int = 18,
    atol: float = 1e-4,
    graphs: Sequence[str] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Export `graphs` (default: all the model supports) to out_dir/<graph>.onnx, check each
    against PyTorch in onnxruntime, and write out_dir/manifest.json; returns the manifest.

    The model is put in float32 eval mode in place (the graphs are float32, dropout off)."""
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    model = model.float().eval()
    specs = graph_specs(model)
    available = [s.name for s in specs]
    wanted = available if graphs is None else list(graphs)
    unknown = [g for g in wanted if g not in available]
    if unknown:
        raise ValueError(f"graphs {unknown} not available for this model; choose from {available}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for spec in (s for s in specs if s.name in wanted):
        path = out / f"{spec.name}.onnx"
        graph_opset = export_graph(spec, path, opset)
        diffs = check_parity(spec, path, atol)
        entries[spec.name] = _graph_entry(spec, path, diffs) | {"opset": graph_opset}
    manifest = _manifest(model, entries, opset, atol, source)
    write_json(out / MANIFEST, manifest)
    return manifest


def _graph_entry(spec: GraphSpec, path: Path, diffs: dict[str, float]) -> dict[str, Any]:
    dtypes = {name: "int64" if name in INT_INPUTS else "float32" for name in spec.inputs}
    return {
        "file": path.name,
        "inputs": [{"name": k, "dtype": dtypes[k], "shape": s} for k, s in spec.inputs.items()],
        "outputs": [{"name": k, "dtype": "float32", "shape": s} for k, s in spec.outputs.items()],
        "parity_max_abs_diff": diffs,
        "parity_runs": list(PARITY_RUNS),
    }


def _manifest(
    model: BLIP, graphs: dict[str, Any], opset: int, atol: float, source: str | None
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    cfg = model.config
    t = cfg.text
    return {
        "format": "dlip-onnx/1",
        "source": source,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "atol": atol,
        "graphs": graphs,
        "decoder": None
        if not cfg.has_decoder
        else {
            "kv_cache": True,
            "num_layers": t.num_layers,
            "cross_attention_layers": cross_layers(model),
            "max_positions": t.max_position_embeddings,
            "prompt": cfg.prompt,
            "usage": "decoder_first on [DEC]+prompt with image_embeds; then decoder_next with "
            "past_self_* = previous present_self_*, past_cross_* = decoder_first's "
            "present_cross_*, attention_mask covering past + new tokens",
        },
        "tokenizer": {
            "vocab_size": t.vocab_size,
            "pad_token_id": Tokenizer.pad_token_id,
            "cls_token_id": Tokenizer.cls_token_id,
            "sep_token_id": Tokenizer.sep_token_id,
            "eos_token_id": Tokenizer.eos_token_id,
            "enc_token_id": Tokenizer.enc_token_id,
            "dec_token_id": Tokenizer.dec_token_id,
            "max_text_length": cfg.max_text_length,
        },
        "preprocessing": {
            "image_size": cfg.vision.image_size,
            "resize": "bicubic, antialias, (S, S) without crop",
            "mean": list(cfg.image_mean),
            "std": list(cfg.image_std),
            "pixel_range": "RGB scaled to [0, 1] before normalisation",
        },
        "model": cfg.to_dict(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
