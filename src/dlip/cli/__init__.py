"""`dlip` command line: thin wrappers that parse arguments and call library functions.

dlip info MODEL [--image-size N] [--json] [--teacher blip_base]
dlip convert SRC --from salesforce --arch blip_base --out DIR
dlip convert SRC_DIR --from hf --out DIR
dlip convert MODEL_DIR --to hf --out DIR
dlip demo
dlip data {build,merge,export-json,shard,synth} ...
dlip pretrain --config YAML [key=value ...] [--resume latest]
dlip finetune retrieval|caption --config YAML [key=value ...] [--resume latest]
dlip eval retrieval|caption --model DIR --data JSON --images ROOT --out DIR
dlip caption|embed|itm|index build|search ...  (inference: dlip.inference.Predictor)
dlip serve --model M [--index DIR] --port P [--host 127.0.0.1]
dlip export onnx MODEL --out DIR [--opset N] [--image-size N] [--atol 1e-4]
dlip bench size|latency|all [--out-dir benchmarks/results] [--models ...] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _model_config(spec: str):
    """A preset name or a saved model directory -> ModelConfig (no weights loaded)."""
    from dlip.config import ModelConfig
    from dlip.models.io import CONFIG_FILE
    from dlip.models.presets import get_config

    path = Path(spec)
    if path.is_dir():
        return ModelConfig.load(path / CONFIG_FILE)
    return get_config(spec)


def cmd_info(args: argparse.Namespace) -> int:
    from dlip.bench import model_info

    config = _model_config(args.model)
    if args.image_size:
        config = config.with_image_size(args.image_size)
    info = model_info(config, text_len=args.text_len)
    if args.teacher and args.teacher != args.model:
        teacher = _model_config(args.teacher).with_image_size(config.vision.image_size)
        info["teacher"] = model_info(teacher, text_len=args.text_len)
        info["ratios"] = _ratios(info, info["teacher"])
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_format_info(info))
    return 0


def _ratios(student: dict, teacher: dict) -> dict[str, float]:
    out = {}
    for group in ("params", "flops"):
        for key, value in student[group].items():
            ref = teacher[group].get(key, 0)
            if ref and value:
                out[f"{group}.{key}"] = value / ref
    return out


def _format_info(info: dict) -> str:
    teacher = info.get("teacher")
    head = f"{info['name']} @ {info['image_size']}px (text {info['text_len']} tokens)"
    if teacher:
        head += f"   vs teacher {teacher['name']}"
    lines = [
        head,
        f"{'parameters':<22}{'count':>14}" + (f"{'teacher':>14}{'ratio':>9}" if teacher else ""),
    ]
    for key, value in info["params"].items():
        lines.append(_row(key, value, teacher and teacher["params"][key], 1e6, "M"))
    lines.append("forward FLOPs")
    for key, value in info["flops"].items():
        ref = teacher and teacher["flops"].get(key)
        lines.append(_row(key, value, ref, 1e9, "G"))
    lines += [
        "params: unique tensors (tied weights once; momentum copies are never part of a model);",
        "  retrieval = vision + text + fusion + heads, captioning = vision + whole decoder.",
        "FLOPs: torch.utils.flop_counter (multiply-add = 2), batch 1; caption_token = one",
        "  decoder step with the KV cache holding the image and text_len - 1 tokens.",
    ]
    return "\n".join(lines)


def _row(key: str, value: int, ref: int | None, scale: float, unit: str) -> str:
    row = f"  {key:<20}{value / scale:>13.2f}{unit}"
    if ref is not None:
        ratio = f"{value / ref:>8.1%}" if ref else f"{'-':>8}"
        row += f"{ref / scale:>13.2f}{unit}{ratio}"
    return row


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=["retrieval", "caption"])
    parser.add_argument("--config", default=None, help="run yaml (differences from defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model.checkpoint=DIR")
    parser.add_argument("--resume", choices=["latest"], default=None, help="continue the run")
    parser.add_argument("--no-test", action="store_true", help="skip the final data.test eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters per module and forward FLOPs per task")
    p.add_argument("model", help="preset name (dlip.list_presets()) or saved model directory")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--teacher", default="blip_base", help="compare against this (''=none)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert",
        help="Salesforce .pth / HF BLIP -> dlip, or dlip -> HF",
        description="Strict conversion: an unknown or missing key is an error that names it.",
    )
    p.add_argument(
        "src", help="a .pth file (--from salesforce) or a directory (--from hf / --to hf)"
    )
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=["salesforce", "hf"])
    direction.add_argument("--to", dest="target", choices=["hf"])
    p.add_argument("--arch", default="blip_base", help="preset of a Salesforce checkpoint")
    p.add_argument("--image-size", type=int, default=None, help="resize pos_embed to this size")
    p.add_argument(
        "--form",
        choices=["captioning", "retrieval"],
        default=None,
        help="--to hf: which transformers class to write (default: every form the model has)",
    )
    p.add_argument(
        "--vision-ln-eps",
        type=float,
        default=None,
        help="--from hf: override the ViT LayerNorm eps (HF hub configs say 1e-5, BLIP used 1e-6)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func="dlip.models.convert:cmd_convert")

    p = sub.add_parser(
        "demo", help="distil a teacher into a student on synthetic data, evaluate, report (CPU)"
    )
    from dlip.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func="dlip.demo:cmd_demo")

    p = sub.add_parser("pretrain", help="distillation pretraining (one process or torchrun)")
    p.add_argument("--config", default=None, help="run yaml (differences from the defaults)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. run_dir=DIR max_steps=N")
    p.add_argument("--resume", choices=["latest"], default=None, help="continue run_dir's run")
    p.set_defaults(func="dlip.train.pretrain:cmd_pretrain")

    p = sub.add_parser("finetune", help="finetune for retrieval or captioning (torchrun too)")
    add_finetune_arguments(p)
    p.set_defaults(func="dlip.train.finetune:cmd_finetune")

    p = sub.add_parser("serve", help="the demo web app: caption, ITM and search in a browser")
    p.add_argument("--model", required=True, help="saved model directory or preset name")
    p.add_argument("--index", default=None, help="image index directory (dlip index build)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads get 413")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info"])
    p.set_defaults(func="dlip.serve:cmd_serve")

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
    q.add_argument("--atol", type=float, default=1e-4, help="parity tolerance (max abs diff)")
    q.add_argument("--graphs", default=None, help="comma list (default: all the model has)")
    q.set_defaults(func="dlip.export:cmd_export")

    p = sub.add_parser(
        "bench",
        help="params/FLOPs per task, latency teacher vs students -> JSON records",
        description="size: params and FLOPs of the presets at 224/384 px vs blip_base. latency: "
        "one run, warm-up then medians: image embedding, ITM re-rank of k texts, 3-beam captions.",
    )
    p.add_argument("what", choices=["size", "latency", "all"])
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON records go")
    p.add_argument(
        "--models",
        default="blip_base,dlip_base,dlip_small,dlip_tiny",
        help="latency: presets to time (size counts every preset but test_tiny)",
    )
    p.add_argument("--teacher", default="blip_base", help="latency speed-ups are against this")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda: bf16 autocast)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row (all rows)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (all rows)")
    p.set_defaults(func="dlip.benchmarks.cli:cmd_bench")

    from dlip.data.cli import add_data_parser
    from dlip.eval.cli import add_eval_parser
    from dlip.inference_cli import add_inference_parser

    add_data_parser(sub)
    add_eval_parser(sub)
    add_inference_parser(sub)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line. `key=value` overrides may also follow options
    (`dlip finetune retrieval --config X optim.lr=1e-4`): argparse alone leaves those unparsed
    once the optional positional list was consumed before the option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # --help exits here, before torch is imported
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    from dlip.models.io import CheckpointError

    func = args.func
    if isinstance(func, str):  # "module:function", imported only when that command runs
        module, name = func.split(":")
        func = getattr(importlib.import_module(module), name)
    try:
        return func(args)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"dlip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
