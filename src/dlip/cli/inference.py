"""`dlip caption | embed | itm | index build | search | serve | export`: the deploy half
(dlip.inference), imported when a command runs so `dlip --help` stays light.

    dlip caption IMG... --model M [--beams N] [--sample --seed S] [--json]
    dlip embed IMG... | --text T... --model M [--out FILE.npy|FILE.safetensors] [--json]
    dlip itm IMG TEXT --model M [--json]
    dlip vqa IMG "QUESTION"... --model VQA_MODEL [--answers answer_list.json] [--json]
    dlip index build IMAGE_DIR --model M --out INDEX [--batch-size B] [--no-resume]
    dlip search INDEX "a dog on a beach" [-k 10] [--rerank 50] [--model M] [--json]
    dlip serve --model M [--index DIR] --port P [--host 127.0.0.1]
    dlip export onnx MODEL --out DIR [--opset N] [--image-size N] [--atol 1e-4]

`--model` is required (a saved model directory or a preset name; a preset has random weights
and says so), except for `search`, which defaults to the model recorded in the index.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlip.cli.common import add_beam_scoring, positive_number

_MODEL_HELP = "saved model directory (or a preset name: random weights, for smoke tests)"


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help=_MODEL_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images")
    p.add_argument(
        "--quantize", choices=["int8"], default=None,
        help="int8: dynamic int8 linear layers (CPU, float32; faster, slightly different)",
    )  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images (beam search, or nucleus sampling)")
    p.add_argument("images", nargs="+", help="image files")
    _model_args(p)
    p.add_argument("--beams", type=int, default=3, help="beam width (1 = greedy)")
    p.add_argument("--max-length", type=int, default=20, help="tokens, prompt included")
    p.add_argument("--min-length", type=int, default=5, help="tokens, prompt included")
    p.add_argument("--prompt", default=None, help="default: the model config's prompt")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beams")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print [{image, caption}] as JSON")
    add_beam_scoring(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("embed", help="normalised ITC embeddings of images or texts")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", nargs="+", default=None, help="embed these texts instead")
    _model_args(p)
    p.add_argument("--out", default=None, help="write (N, E) float32 to FILE.npy / .safetensors")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print {inputs, embeddings} as JSON")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("itm", help="probability that an image and a text match (ITM head)")
    p.add_argument("image")
    p.add_argument("text")
    _model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_itm)

    p = sub.add_parser("vqa", help="answer questions about an image (a VQA model)")
    p.add_argument("image")
    p.add_argument("questions", nargs="+", help="one or more questions about the image")
    _model_args(p)
    p.add_argument("--answers", default=None, help="rank these (BLIP's answer_list.json)")
    p.add_argument("--k-test", type=int, default=128, help="with --answers: re-scored whole")
    p.add_argument("--beams", type=int, default=3, help="generation: beam width")
    add_beam_scoring(p)
    p.add_argument("--json", action="store_true", help="print [{question, answer}] as JSON")
    p.set_defaults(func=cmd_vqa)

    p = sub.add_parser("index", help="build a searchable image index")
    actions = p.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="embed every image under a directory (resumable)")
    b.add_argument("image_dir")
    _model_args(b)
    b.add_argument("--out", required=True, help="index directory")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk")
    b.add_argument("--no-resume", action="store_true", help="discard chunks of an earlier run")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    b.add_argument(
        "--faiss", choices=["auto", "on", "off"], default="auto",
        help="write a FAISS index beside it (image.index): auto once --faiss-min-size images",
    )  # fmt: skip
    b.add_argument("--faiss-min-size", type=int, default=100_000)
    b.set_defaults(func=cmd_index_build)
    e = actions.add_parser(
        "export", help="an index as clip-retrieval reads it (npy + parquet + image.index)"
    )
    e.add_argument("index", help="index directory (dlip index build)")
    e.add_argument("--to", choices=["clip-retrieval"], default="clip-retrieval")
    e.add_argument("--out", required=True, help="clip-retrieval embeddings / indice folder")
    e.set_defaults(func=cmd_index_export)

    p = sub.add_parser("search", help="text -> image search over an index (ITC, ITM re-rank)")
    p.add_argument("index", help="index directory (dlip index build)")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10, help="hits to return")
    p.add_argument("--rerank", type=int, default=None, help="re-rank the ITC top-N with ITM")
    _model_args(p, required=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)
    _register_deploy(sub)


def _register_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the demo web app: caption, ITM and search in a browser")
    p.add_argument("--model", required=True, help="saved model directory or preset name")
    p.add_argument("--index", default=None, help="image index directory (dlip index build)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8"], default=None, help="CPU int8 linear layers")
    p.add_argument(
        "--max-batch", type=int, default=8,
        help="concurrent caption requests run as one batch of up to this many (1: one by one)",
    )  # fmt: skip
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch gathers")
    p.add_argument(
        "--max-upload-mb", type=positive_number, default=20.0, help="larger uploads get 413"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info"])
    p.add_argument("--answers", default=None, help="VQA model: rank this answer_list.json")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a model to ONNX, checked against PyTorch")
    formats = p.add_subparsers(dest="format", required=True)
    q = formats.add_parser(
        "onnx",
        help="image/text encoders, ITM scorer, KV-cache caption decoder + manifest.json",
        description="Each graph is run in onnxruntime at two batch sizes and lengths; a max abs "
        "difference from PyTorch above --atol fails the export.",
    )
    q.add_argument("model", help="preset name or saved model directory")
    q.add_argument("--out", required=True, help="output directory (graphs + manifest.json)")
    q.add_argument("--opset", type=int, default=18)
    q.add_argument("--image-size", type=int, default=None, help="resize pos_embed first")
    q.add_argument(
        "--atol", type=positive_number, default=1e-4, help="parity tolerance (max abs diff)"
    )
    q.add_argument("--graphs", default=None, help="comma list (default: all the model has)")
    q.add_argument(
        "--quantize", choices=["int8"], default=None,
        help="int8 graphs in OUT (onnxruntime dynamic quantization), float32 ones in OUT/float32",
    )  # fmt: skip
    q.set_defaults(func=cmd_export)


def _predictor(args: argparse.Namespace, model: str | None = None):
    from dlip.inference.predictor import Predictor

    return Predictor.load(
        model or args.model, device=args.device, dtype=args.dtype, max_pixels=args.max_pixels,
        quantize=args.quantize,
    )  # fmt: skip


def cmd_caption(args: argparse.Namespace) -> int:
    pred = _predictor(args)
    caps = pred.caption(
        args.images,
        num_beams=args.beams,
        max_length=args.max_length,
        min_length=args.min_length,
        prompt=args.prompt,
        sample=args.sample,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        beam_scoring=args.beam_scoring,
    )
    if args.json:
        rows = [{"image": i, "caption": c} for i, c in zip(args.images, caps, strict=True)]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        for image, cap in zip(args.images, caps, strict=True):
            print(f"{image}\t{cap}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.text):
        raise ValueError("give image files or --text, not both (nor neither)")
    pred = _predictor(args)
    if args.text:
        inputs, feats = args.text, pred.embed_texts(args.text, batch_size=args.batch_size)
    else:
        inputs, feats = args.images, pred.embed_images(args.images, batch_size=args.batch_size)
    if args.out:
        _save_array(feats, Path(args.out))
    if args.json:
        print(json.dumps({"inputs": inputs, "embeddings": feats.tolist()}))
    else:
        where = f" -> {args.out}" if args.out else ""
        print(f"{feats.shape[0]} embeddings of dim {feats.shape[1]}{where}")
    return 0


def _save_array(feats, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, feats.numpy())
    elif out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"embeddings": feats.contiguous()}, str(out))
    else:
        raise ValueError(f"--out {out}: use a .npy or .safetensors file name")


def cmd_itm(args: argparse.Namespace) -> int:
    prob = float(_predictor(args).itm_scores(args.image, args.text)[0])
    if args.json:
        print(json.dumps({"image": args.image, "text": args.text, "match_probability": prob}))
    else:
        print(f"{prob:.4f}")
    return 0


def cmd_vqa(args: argparse.Namespace) -> int:
    answers = None
    if args.answers:
        from dlip.eval.vqa_eval import read_answer_list

        answers = read_answer_list(args.answers)  # before the model loads
    got = _predictor(args).vqa(
        args.image, args.questions, answers, k_test=args.k_test, num_beams=args.beams,
        beam_scoring=args.beam_scoring,
    )  # fmt: skip
    if args.json:
        rows = [{"question": q, "answer": a} for q, a in zip(args.questions, got, strict=True)]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        for question, answer in zip(args.questions, got, strict=True):
            print(f"{question}\t{answer}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from dlip.inference.index import build_index, check_out_dir, list_images

    check_out_dir(args.out)  # both before the model is loaded
    list_images(args.image_dir)
    report = build_index(
        _predictor(args),
        args.image_dir,
        args.out,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        progress=not args.no_progress,
        chunk_size=args.chunk_size,
        workers=args.workers,
        faiss=args.faiss,
        faiss_min_size=args.faiss_min_size,
    )
    skipped = ", ".join(f"{k} {v}" for k, v in report.skipped.items()) or "none"
    resumed = f" ({report.resumed_chunks} chunks resumed)" if report.resumed_chunks else ""
    print(f"indexed {report.count} images into {report.out}{resumed}; skipped: {skipped}")
    for name, reason in list(report.bad_files.items())[:10]:
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    return 0


def cmd_index_export(args: argparse.Namespace) -> int:
    from dlip.inference.ann import export_clip_retrieval
    from dlip.inference.index import ImageIndex

    written = export_clip_retrieval(ImageIndex.load(args.index), args.out)
    faiss = written["faiss"] or "none (faiss not installed: `clip-retrieval index` builds it)"
    print(f"wrote {written['embeddings']} embeddings (dim {written['dim']}) + metadata to "
          f"{args.out}; image.index: {faiss}")  # fmt: skip
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from dlip.inference.index import ImageIndex

    index = ImageIndex.load(args.index)
    model = args.model or index.meta.get("model")
    if not model:
        raise ValueError(f"{args.index} records no model: pass --model")
    hits = _predictor(args, model).search(args.query, index, k=args.k, rerank=args.rerank)
    skipped = getattr(hits, "skipped", {})
    if skipped:  # files of the index that re-ranking could no longer read
        print(f"skipped {len(skipped)} unreadable index files:", file=sys.stderr)
        for name, reason in list(skipped.items())[:10]:
            print(f"  {name}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps([vars(h) for h in hits], indent=1))
    else:
        for rank, h in enumerate(hits, 1):
            itm = f"  itm {h.itm:.4f}" if h.itm is not None else ""
            print(f"{rank:>3}  {h.score:.4f}  itc {h.itc:.4f}{itm}  {h.path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dlip.inference.serve import serve

    serve(
        args.model, index=args.index, host=args.host, port=args.port, device=args.device,
        dtype=args.dtype, max_upload_mb=args.max_upload_mb, log_level=args.log_level,
        answers=args.answers, quantize=args.quantize, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
    )  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`dlip export onnx MODEL --out DIR`: export, check parity, print a summary."""
    from dlip.inference.onnx import MANIFEST, export_onnx
    from dlip.models.io import resolve

    model = resolve(args.model)
    if args.image_size:
        model.set_image_size(args.image_size)
    graphs = args.graphs.split(",") if args.graphs else None
    out = Path(args.out)
    fp32_dir = out / "float32" if args.quantize else out  # int8: the float graphs kept beside
    manifest = export_onnx(model, fp32_dir, args.opset, args.atol, graphs, source=args.model)
    for name, entry in manifest["graphs"].items():
        diff = max(entry["parity_max_abs_diff"].values())
        print(f"{name:<14} {entry['file']:<20} parity max abs diff {diff:.2e}")
    if args.quantize:
        from dlip.inference.onnx import quantize_onnx_dir

        manifest = quantize_onnx_dir(fp32_dir, out)
        for name, entry in manifest["graphs"].items():
            err = max(entry["int8_rel_error"].values())
            print(f"{name:<14} int8 relative error vs float32 {err:.2e}")
    print(f"wrote {out / MANIFEST}")
    return 0
