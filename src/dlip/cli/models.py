"""`dlip info` and `dlip convert`: a model's size and compute; checkpoints in and out.

dlip info MODEL [--image-size N] [--json] [--teacher blip_base]
dlip convert SRC --from salesforce --arch blip_base --out DIR
dlip convert SRC_DIR --from hf --out DIR
dlip convert MODEL_DIR --to hf --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters per module and forward FLOPs per task")
    p.add_argument("model", help="preset name (dlip.list_presets()) or saved model directory")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument(
        "--teacher",
        default=None,
        help="compare against this (''=none; default blip_base, blip_base_vqa for a VQA model)",
    )
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
        choices=["captioning", "retrieval", "vqa"],
        default=None,
        help="--to hf: which transformers class to write (default: every form the model has)",
    )
    p.add_argument(
        "--vision-ln-eps",
        type=float,
        default=None,
        help="--from hf: override the ViT LayerNorm eps (HF hub configs say 1e-5, BLIP used 1e-6)",
    )
    p.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="--to hf: a `dlip eval` results.json whose metrics go into the model card "
        "(repeat for several tasks)",
    )
    p.add_argument("--license", default="apache-2.0", help="--to hf: the model card's license id")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_convert)


def cmd_info(args: argparse.Namespace) -> int:
    from dlip.models.counting import model_info
    from dlip.models.io import resolve_config

    config = resolve_config(args.model)
    if args.image_size:
        config = config.with_image_size(args.image_size)
    info = model_info(config, text_len=args.text_len)
    if args.teacher is None:
        args.teacher = "blip_base_vqa" if config.vqa else "blip_base"
    if args.teacher and args.teacher != args.model:
        teacher = resolve_config(args.teacher).with_image_size(config.vision.image_size)
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


def cmd_convert(args: argparse.Namespace) -> int:
    from dlip.models.convert import (
        HF_CLASSES,
        convert_hf,
        convert_salesforce,
        export_hf,
        model_forms,
    )
    from dlip.models.io import save

    out = Path(args.out)
    if args.target == "hf":
        from dlip.models.hf_files import read_results
        from dlip.models.io import load

        model = load(args.src)
        results = [read_results(path) for path in args.results]  # fail before writing
        from dlip.progress import bar

        forms = [args.form] if args.form else model_forms(model.config)
        for form in bar(forms, desc="export to transformers", unit="form"):
            dest = out if len(forms) == 1 else out / form
            export_hf(model, dest, form, args.src, results, args.license)
            print(f"wrote {HF_CLASSES[form]} + processor + model card to {dest}")
        return 0
    if args.source == "salesforce":
        model = convert_salesforce(args.src, args.arch, args.image_size)
    else:
        model = convert_hf(args.src, vision_ln_eps=args.vision_ln_eps)
        eps = model.config.vision.layer_norm_eps
        if eps != 1e-6:
            print(
                f"note: vision layer_norm_eps={eps} as the HF config says; BLIP's ViT used 1e-6 "
                "(--vision-ln-eps 1e-6 reproduces the original model)"
            )
        if args.image_size:
            model.set_image_size(args.image_size)
    save(model, out)
    c = model.config
    forms = ", ".join(model_forms(c))
    print(
        f"wrote {out}: {c.name} ({forms}) @ {c.vision.image_size}px, {model.num_params():,} params"
    )
    return 0
