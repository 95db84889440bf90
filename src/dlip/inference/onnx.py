"""ONNX export of a BLIP model: one graph per serving task, checked against PyTorch on export.

Graphs (each present only when the model has the parts it needs):

- `image_encoder`: pixels (B, 3, S, S) -> image_embeds (B, N, Dv), image_feat (B, E)
- `text_encoder`: input_ids, attention_mask (B, T) -> text_feat (B, E), text_cls (B, Dt)
- `itm`: image_embeds, input_ids ([ENC] first), attention_mask -> itm_logits (B, 2)
- `decoder_first`: image_embeds, input_ids ([DEC] + prompt), attention_mask -> logits (B, T, V)
  plus present self-attention K/V and the image cross-attention K/V of every layer
- `decoder_next`: new input_ids (B, T), attention_mask (B, P+T), past self K/V (P tokens) and
  the cross K/V from `decoder_first` -> logits (B, T, V) and present self K/V (P+T tokens)

A VQA model (config vqa=true) gets `image_encoder` (image_embeds only), `question_encoder`
(image_embeds, input_ids with [ENC] first, attention_mask -> question_states (B, T, D)) and
`answer_decoder` (question_states, question_mask (B, Tq), input_ids with [DEC] first,
attention_mask (B, T) -> logits (B, T, V); whole answers, no cache), which serve both rank
mode (score the candidates) and generation (one call per step). The wrappers and shapes are in
dlip.inference.onnx_graphs.

We use the dynamo exporter (`torch.onnx.export(dynamo=True)`, via torch.export): the legacy
TorchScript tracer bakes the KV-cache length and the causal-mask size into constants (tested:
wrong logits at another batch/length). Every graph is run in onnxruntime on random inputs at
two batch sizes and lengths other than the export example; a max abs difference above `atol`
fails the export with an `ExportParityError` naming the graph, output and difference.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlip.fileio import write_json
from dlip.inference.onnx_graphs import DecoderNext, GraphSpec, Shape, cross_layers, graph_specs
from dlip.inference.ort import FORMAT, MANIFEST, cpu_session
from dlip.models.blip import BLIP
from dlip.tokenizer import Tokenizer

GRAPHS = ("image_encoder", "text_encoder", "itm", "decoder_first", "decoder_next")
VQA_GRAPHS = ("image_encoder", "question_encoder", "answer_decoder")
# Export example sizes: >= 2 and pairwise distinct so torch.export neither specialises a dim
# to 0/1 nor assumes two dims equal; parity then runs at other sizes (batch 1 included).
EXAMPLE = {"batch": 2, "seq": 7, "past": 6, "new": 3}
PARITY_RUNS = (
    {"batch": 1, "seq": 5, "past": 5, "new": 1},
    {"batch": 3, "seq": 9, "past": 8, "new": 2},
)
INT_INPUTS = ("input_ids", "attention_mask", "question_mask")


class ExportParityError(ValueError):
    """onnxruntime disagrees with PyTorch beyond atol on one output of one graph."""


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
    return cpu_session(path).run(None, feeds)


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
    from dlip.progress import bar

    entries = {}
    for spec in bar([s for s in specs if s.name in wanted], desc="export + check", unit="graph"):
        path = out / f"{spec.name}.onnx"
        graph_opset = export_graph(spec, path, opset)
        diffs = check_parity(spec, path, atol)
        entries[spec.name] = _graph_entry(spec, path, diffs) | {"opset": graph_opset}
    manifest = _manifest(model, entries, opset, atol, source)
    write_json(out / MANIFEST, manifest)
    return manifest


def quantize_onnx_dir(src: str | Path, dst: str | Path, rtol: float = 0.1) -> dict[str, Any]:
    """int8 copy of a float32 export: every MatMul / Gemm with a constant weight gets int8
    weights (per output channel) and int8 activations quantized per call (onnxruntime's
    `quantize_dynamic`, DynamicQuantizeLinear + MatMulInteger); embeddings, LayerNorms and
    softmaxes stay float32. Each graph is re-run on the parity inputs against the float32
    graph: a relative L2 error above `rtol` on any output fails (the differences are recorded
    in the manifest, `int8_rel_error`). Returns dst's manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    manifest = json.loads((src / MANIFEST).read_text())
    if manifest.get("quantize"):
        raise ValueError(f"{src}: already {manifest['quantize']}; quantize a float32 export")
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantize_onnx_dir: write to another directory than {src}")
    dst.mkdir(parents=True, exist_ok=True)
    vocab = manifest["tokenizer"]["vocab_size"]  # random ids for the error check
    for name, entry in manifest["graphs"].items():
        prepared = dst / f".prep_{entry['file']}"
        _fold_weight_transposes(src / entry["file"], prepared)
        with warnings.catch_warnings(), _quiet_root_log():  # "consider pre-processing" notes
            warnings.simplefilter("ignore")
            quantize_dynamic(
                prepared, dst / entry["file"], weight_type=QuantType.QInt8,
                per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
            )  # fmt: skip
        for leftover in dst.glob(f"{prepared.name}*"):
            leftover.unlink()
        entry["int8_rel_error"] = _int8_error(
            name, (src / entry["file"], dst / entry["file"]), vocab, rtol
        )
    manifest["quantize"] = "int8"
    manifest["int8"] = {
        "quantizer": "onnxruntime.quantization.quantize_dynamic",
        "weights": "QInt8 per output channel",
        "ops": ["MatMul", "Gemm"],
        "rtol": rtol,
    }
    write_json(dst / MANIFEST, manifest)
    return manifest


@contextmanager
def _quiet_root_log() -> Iterator[None]:
    """onnxruntime's quantizer logs advice through the root logger; keep it off the console."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _fold_weight_transposes(path: Path, out: Path) -> int:
    """Write `path` with every MatMul weight given as Transpose(initializer) replaced by a
    transposed initializer; returns how many. The exporter emits the LM head that way (its
    weight is tied to the word embeddings, which a Gather still reads), and the quantizer only
    converts a MatMul whose weight is an initializer: the 30,524-way head would stay float32."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    folded = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        src = producer.get(node.input[1])
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[src.input[0]])
        name = f"{src.input[0]}__transposed"
        if name not in inits:
            tensor = numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name)
            graph.initializer.append(tensor)
            inits[name] = tensor
        node.input[1] = name
        folded += 1
    large = sum(t.ByteSize() for t in graph.initializer) > 1_500_000_000
    onnx.save(proto, str(out), save_as_external_data=large, location=f"{out.name}.data")
    return folded


def _random_feeds(session: Any, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for a graph from its declared inputs: batch 2, seq 5, past_seq 4; ids
    in [1, vocab), masks all ones, float tensors standard normal."""
    sizes = {"batch": 2, "seq": 5, "past_seq": 4, "question_seq": 6}
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        # symbolic axes: "batch", "seq", "past_seq+seq", ...
        shape = [d if isinstance(d, int) else sum(sizes[p] for p in d.split("+"))
                 for d in arg.shape]  # fmt: skip
        if arg.type == "tensor(int64)":
            ids = "mask" not in arg.name
            feeds[arg.name] = rng.integers(1, vocab, shape) if ids else np.ones(shape, np.int64)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _int8_error(name: str, files: tuple[Path, Path], vocab: int, rtol: float) -> dict[str, float]:
    """Relative L2 error ||int8 - fp32|| / ||fp32|| per output on random inputs."""
    sessions = [cpu_session(p) for p in files]
    feeds = _random_feeds(sessions[0], vocab, seed=0)
    ref, got = (s.run(None, feeds) for s in sessions)
    names = [o.name for o in sessions[0].get_outputs()]
    errors = {}
    for out, a, b in zip(names, ref, got, strict=True):
        err = float(np.linalg.norm(b - a) / max(float(np.linalg.norm(a)), 1e-12))
        if not err <= rtol:
            raise ExportParityError(
                f"int8 ONNX graph {name!r} output {out!r}: relative error {err:.3g} > {rtol:g}"
            )
        errors[out] = err
    return errors


def _graph_entry(spec: GraphSpec, path: Path, diffs: dict[str, float]) -> dict[str, Any]:
    dtypes = {name: "int64" if name in INT_INPUTS else "float32" for name in spec.inputs}
    return {
        "file": path.name,
        "inputs": [{"name": k, "dtype": dtypes[k], "shape": s} for k, s in spec.inputs.items()],
        "outputs": [{"name": k, "dtype": "float32", "shape": s} for k, s in spec.outputs.items()],
        "parity_max_abs_diff": diffs,
        "parity_runs": list(PARITY_RUNS),
    }


def _vqa_usage() -> dict[str, Any]:
    from dlip.models.vqa import QUESTION_LENGTH

    return {
        "question_max_length": QUESTION_LENGTH,
        "usage": "question_encoder on pre_question'd questions ([ENC] first) with image_embeds; "
        "answer_decoder on [DEC] + answer tokens with those states and the question mask. "
        "rank: softmax of logits[:, 0] scores each candidate's first token, the top k_test are "
        "scored by the label-smoothed (0.1) token cross-entropy summed over the answer "
        "([SEP] included), lowest wins; generate: beam search from [DEC] (dlip.models.vqa)",
    }


def _manifest(
    model: BLIP, graphs: dict[str, Any], opset: int, atol: float, source: str | None
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    from dlip.inference.predictor import model_fingerprint

    cfg = model.config
    t = cfg.text
    return {
        "format": FORMAT,
        "source": source,
        # the PyTorch model's weight hash: an index built with either backend serves the other
        "fingerprint": model_fingerprint(model),
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "atol": atol,
        "graphs": graphs,
        "vqa": None if not cfg.vqa else _vqa_usage(),
        "decoder": None
        if not cfg.has_decoder or cfg.vqa
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
