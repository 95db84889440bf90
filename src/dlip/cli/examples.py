"""An example for every command's `--help` (its epilog), and the examples a group shows.

Each example is a real command line; tests parse every one with `dlip`'s own parser, so an
example that stops matching its command's arguments fails the suite.
"""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, list[str]] = {
    "info": ["dlip info dlip_small --teacher blip_base", "dlip info runs/student/final --json"],
    "convert": [
        "dlip convert model_base_retrieval_coco.pth --from salesforce --arch blip_base "
        "--out teacher/",
        "dlip convert blip-itm-base-coco/ --from hf --out teacher/",
        "dlip convert runs/caption/best --to hf --results runs/caption/test/results.json "
        "--out student_hf/",
    ],
    "demo": ["dlip demo", "dlip demo --quick --out runs/demo_quick"],
    "pretrain": [
        "dlip pretrain --config configs/pretrain/tiny_synth.yaml run_dir=runs/tiny",
        "dlip pretrain --config configs/pretrain/dlip_small_from_blip_base.yaml --print-config",
        "torchrun --nproc_per_node=8 -m dlip pretrain "
        "--config configs/pretrain/dlip_small_from_blip_base.yaml --resume auto",
    ],
    "finetune": [
        "dlip finetune retrieval --config configs/finetune/retrieval_coco.yaml "
        "model.checkpoint=runs/pretrain/final",
        "dlip finetune caption --config configs/finetune/caption_coco.yaml "
        "run.report_to=[jsonl,wandb]",
    ],
    "caption": [
        "dlip caption photo.jpg more/*.jpg --model runs/caption/best --json",
        "dlip caption photo.jpg --model onnx_int8/",
    ],
    "embed": ["dlip embed photos/*.jpg --text 'a dog on a beach' --model DIR --out feats.npz"],
    "itm": ["dlip itm photo.jpg 'a cat on a blanket' --model runs/retrieval/best"],
    "vqa": ["dlip vqa photo.jpg 'what color is the car?' --model runs/vqa/best"],
    "index build": ["dlip index build photos/ --model runs/ret/best --out index/ --workers 4"],
    "index export": ["dlip index export index/ --to clip-retrieval --out clip_index/"],
    "search": ["dlip search index/ 'a dog on a beach' -k 10 --rerank 50"],
    "serve": ["dlip serve --model runs/retrieval/best --index index/ --port 8000"],
    "export onnx": [
        "dlip export onnx runs/caption/best --out onnx/",
        "dlip export onnx runs/caption/best --out onnx_int8/ --quantize int8",
    ],
    "data build img2dataset": [
        "dlip data build img2dataset cc3m_wds/ --source cc3m --out cc3m.jsonl"
    ],
    "data build vg": ["dlip data build vg visual_genome/ --out vg.jsonl"],
    "data build karpathy": [
        "dlip data build karpathy dataset_coco.json --images coco/ --out coco_karpathy/"
    ],
    "data build vqa": [
        "dlip data build vqa --questions v2_OpenEnded_mscoco_train2014_questions.json "
        "--annotations v2_mscoco_train2014_annotations.json --images coco/ --out vqa/"
    ],
    "data build flickr30k-csv": [
        "dlip data build flickr30k-csv results.csv --images flickr30k-images/ --out flickr30k/"
    ],
    "data merge": [
        "dlip data merge cc3m.jsonl vg.jsonl --exclude-karpathy coco_karpathy/ --out pretrain.jsonl"
    ],
    "data export-json": ["dlip data export-json pretrain.jsonl --out pretrain_blip.json"],
    "data synth": ["dlip data synth --out synth/ --n 1000 --image-size 64"],
    "data teacher-captions": [
        "dlip data teacher-captions --model teacher_caption/ --manifest pretrain.jsonl "
        "--out teacher_captions.jsonl"
    ],
    "data shard": ["dlip data shard pretrain.jsonl --out shards/ --max-side 384"],
    "eval retrieval": [
        "dlip eval retrieval --model runs/retrieval/best --data coco_karpathy/test.json "
        "--images coco/ --out results/"
    ],
    "eval caption": [
        "dlip eval caption --model runs/caption/best --data coco_karpathy/test.json "
        "--images coco/ --out results/"
    ],
    "eval vqa": [
        "dlip eval vqa --model runs/vqa/best --data vqa/test.json --images coco/ --out results/"
    ],
    "bench": ["dlip bench all --models dlip_small --teacher blip_base --threads 1"],
    "completion": ['eval "$(dlip completion bash)"   # in ~/.bashrc'],
}


def add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[str]:
    """Set every (sub)command's epilog to its examples, a group's to the first example of each
    of its commands; returns what a parent group shows. The top-level help stays short."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    own = list(EXAMPLES.get(" ".join(path), []))
    below = [
        line for a in subs for n, sub in a.choices.items() for line in add_examples(sub, (*path, n))
    ]
    lines = own or below
    if lines and path:
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return own[:1] or below
