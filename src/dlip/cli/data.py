"""`dlip data ...`: build manifests from what the real tools write, merge, shard, synthesize.

    dlip data build img2dataset OUTPUT_FOLDER --out M.jsonl [--extract-to DIR] [--verify]
    dlip data build vg VG_ROOT --out M.jsonl [--min-words 3] [--min-area 0.1] [--max-per-image 10]
    dlip data build karpathy ANNOTATION.json --images IMAGE_ROOT --out M.jsonl
    dlip data build flickr30k-csv results.csv --images IMAGE_DIR --out M.jsonl
    dlip data merge A.jsonl B.jsonl ... --out ALL.jsonl [--exclude-karpathy SPLIT.json ...]
                    [--dedupe-mib 256] [--tmp-dir DIR]
    dlip data export-json M.jsonl [M2.jsonl ...] --out all.json
    dlip data synth --out DIR --n N [--seed S] [--image-size 64] [--overwrite]
    dlip data shard MANIFEST --out DIR [--max-side 384] [--shard-size 1000] [--workers N]

Parsers only import argparse; each command imports its library module when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare data: manifests, shards, synthetic set")
    cmds = data.add_subparsers(dest="data_command", required=True)

    _add_build_parsers(cmds)

    p = cmds.add_parser("merge", help="merge manifests: dedupe, leakage guard, per-source counts")
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--exclude-karpathy",
        nargs="*",
        default=[],
        type=Path,
        help="Karpathy val/test JSONs: drop their COCO / Flickr30K images from the mix",
    )
    p.add_argument("--no-dedupe", action="store_true", help="keep repeated image+caption rows")
    p.add_argument(
        "--dedupe-mib",
        type=float,
        default=256,
        help="dedupe memory budget, whatever the row count (64 bytes a row held; more spill)",
    )
    p.add_argument(
        "--tmp-dir", type=Path, default=None, help="dedupe spill files (default: --out's folder)"
    )
    p.set_defaults(func=cmd_merge)

    p = cmds.add_parser("export-json", help="the seed's all.json: [{caption, image_root, id}]")
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_export_json)

    p = cmds.add_parser("synth", help="procedurally generated image-caption dataset")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", required=True, type=int, help="number of images (all splits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synth output")
    p.set_defaults(func=cmd_synth)

    p = cmds.add_parser(
        "teacher-captions",
        help="a manifest of a teacher's beam-search captions (sequence-level KD, CapFilt-style)",
    )
    p.add_argument("--model", required=True, help="the teacher: a saved model directory")
    p.add_argument("--manifest", required=True, type=Path, help="images to caption (jsonl)")
    p.add_argument("--out", required=True, type=Path, help="the manifest to write (jsonl)")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--min-length", type=int, default=5)
    p.add_argument("--prompt", default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_teacher_captions)

    p = cmds.add_parser("shard", help="write webdataset shards from a manifest (resumable)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-side", type=int, default=384, help="re-encode so the longest side <= N")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0 = inline)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    p.set_defaults(func=cmd_shard)


def cmd_synth(args: argparse.Namespace) -> int:
    from dlip.data.synth_vqa import synthesize_vqa
    from dlip.data.synthetic import synthesize

    report = synthesize(
        args.out, args.n, seed=args.seed, image_size=args.image_size, overwrite=args.overwrite
    )
    print(report.summary())
    questions = synthesize_vqa(args.out, seed=args.seed)
    print("VQA questions: " + ", ".join(f"{s} {n}" for s, n in questions.items()))
    return 0


def cmd_teacher_captions(args: argparse.Namespace) -> int:
    from dlip.inference.pseudo import teacher_captions

    report = teacher_captions(
        args.model, args.manifest, args.out, num_beams=args.num_beams,
        max_length=args.max_length, min_length=args.min_length, prompt=args.prompt,
        batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    print(f"{report.summary()} -> {args.out}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from dlip.data.shards import write_shards

    report = write_shards(
        args.manifest,
        args.out,
        max_side=args.max_side,
        shard_size=args.shard_size,
        quality=args.quality,
        resume=not args.no_resume,
        workers=args.workers,
    )
    print(report.summary())
    if not report.complete:
        print("incomplete: run the same command again to resume")
        return 1
    return 0


def _add_build_parsers(cmds: argparse._SubParsersAction) -> None:
    build = cmds.add_parser("build", help="a manifest from one source's real output")
    kinds = build.add_subparsers(dest="kind", required=True)

    p = kinds.add_parser("img2dataset", help="files / webdataset / parquet output (detected)")
    p.add_argument("folder", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--source", default=None, help="source name (default: the folder's name)")
    p.add_argument(
        "--extract-to",
        type=Path,
        default=None,
        help="where images inside tar / parquet shards are written (default: <out>_images/)",
    )
    p.add_argument("--verify", action="store_true", help="fully decode every image")
    p.set_defaults(func=cmd_build)

    p = kinds.add_parser("vg", help="Visual Genome region_descriptions.json + VG_100K{,_2}")
    p.add_argument("root", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--min-words", type=int, default=3)
    p.add_argument("--min-area", type=float, default=0.1, help="region area / image area")
    p.add_argument("--max-per-image", type=int, default=10)
    p.set_defaults(func=cmd_build)

    p = kinds.add_parser("karpathy", help="COCO / Flickr30K Karpathy JSON (BLIP / LAVIS form)")
    p.add_argument("annotation", type=Path)
    p.add_argument("--images", required=True, type=Path, help="image root of the paths")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dataset", choices=["coco", "flickr30k"], default=None)
    p.set_defaults(func=cmd_build)

    p = kinds.add_parser(
        "vqa", help="VQA: BLIP's vqa_*.json / vg_qa.json, or VQAv2 questions + annotations"
    )
    p.add_argument("files", nargs="*", type=Path, help="BLIP's JSON files (vqa_train.json ...)")
    p.add_argument("--questions", type=Path, help="v2_OpenEnded_mscoco_<split>_questions.json")
    p.add_argument("--annotations", type=Path, help="v2_mscoco_<split>_annotations.json")
    p.add_argument("--images", required=True, type=Path, help="COCO image root (train2014/ ...)")
    p.add_argument("--vg-images", type=Path, default=None, help="VG image root (vg_qa.json)")
    p.add_argument("--out", required=True, type=Path, help="VQA rows (jsonl)")
    p.set_defaults(func=cmd_build_vqa)

    p = kinds.add_parser("flickr30k-csv", help="Flickr30K Kaggle results.csv (pipe-delimited)")
    p.add_argument("csv", type=Path)
    p.add_argument("--images", required=True, type=Path, help="the flickr30k_images folder")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_build)


def _rows(args: argparse.Namespace, report):
    from dlip.data import karpathy, manifest

    if args.kind == "img2dataset":
        extract = args.extract_to or manifest.default_extract_dir(args.out)
        return manifest.build_img2dataset(
            args.folder, report=report, source=args.source, extract_to=extract, verify=args.verify
        )
    if args.kind == "vg":
        return manifest.build_vg(
            args.root,
            report=report,
            min_words=args.min_words,
            min_area_frac=args.min_area,
            max_per_image=args.max_per_image,
        )
    if args.kind == "karpathy":
        return karpathy.build_karpathy(
            args.annotation, args.images, report=report, dataset=args.dataset
        )
    return karpathy.build_flickr30k_csv(args.csv, args.images, report=report)


def cmd_build(args: argparse.Namespace) -> int:
    from dlip.data.manifest import BuildReport, write_rows

    report = BuildReport()
    n = write_rows(_rows(args, report), args.out, report)
    print(f"wrote {n} rows to {args.out}\n{report.summary()}")
    return 0


def cmd_build_vqa(args: argparse.Namespace) -> int:
    from dlip.data import vqa
    from dlip.data.rows import BuildReport

    if bool(args.files) == bool(args.questions):
        raise ValueError("give BLIP's JSON files or --questions (+ --annotations), not both")
    if args.annotations and not args.questions:
        raise ValueError("--annotations needs --questions")
    report = BuildReport()
    if args.files:
        rows = vqa.build_vqa_blip(
            args.files, report=report, vqa_root=args.images, vg_root=args.vg_images
        )
    else:
        rows = vqa.build_vqa_official(
            args.questions, args.annotations, report=report, image_root=args.images
        )
    n = vqa.write_vqa(rows, args.out, report)
    print(f"wrote {n} questions to {args.out}\n{report.summary()}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from dlip.data.manifest import BuildReport, merge_manifests, write_rows

    report = BuildReport()
    rows = merge_manifests(
        args.manifests,
        report=report,
        exclude_karpathy=args.exclude_karpathy,
        dedupe=not args.no_dedupe,
        dedupe_mib=args.dedupe_mib,
        tmp_dir=args.tmp_dir or args.out.parent,  # not /tmp: often RAM-backed and small
    )
    n = write_rows(rows, args.out, report)
    print(f"wrote {n} rows to {args.out}\n{report.summary()}")
    return 0


def cmd_export_json(args: argparse.Namespace) -> int:
    from dlip.data.manifest import BuildReport, export_json

    report = BuildReport()
    n = export_json(args.manifests, args.out, report)
    print(f"wrote {n} entries to {args.out}\n{report.summary()}")
    return 0
