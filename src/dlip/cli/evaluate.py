"""`dlip eval retrieval|caption|vqa`: the arguments of dlip.eval's `run_retrieval_eval`,
`run_caption_eval` and `run_vqa_eval`, imported when the command runs (so `dlip --help` stays
light).

    dlip eval retrieval --model DIR --data KARPATHY_TEST.json --images ROOT --out DIR [--k K]
    dlip eval caption   --model DIR --data KARPATHY_TEST.json --images ROOT --out DIR
    dlip eval vqa       --model DIR --data vqa_val.json --images COCO --out DIR \
                        [--mode rank|generate] [--answers answer_list.json]
    torchrun --nproc_per_node=N -m dlip eval retrieval ...   (rows sharded across ranks)
"""

from __future__ import annotations

import argparse

from dlip.cli.common import add_beam_scoring


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved model directory or preset name")
    p.add_argument(
        "--data",
        required=True,
        help="Karpathy val/test json (vqa: BLIP's vqa_*.json or a `dlip data build vqa` jsonl)",
    )
    p.add_argument("--images", required=True, help="image root the json's paths are under")
    p.add_argument("--out", required=True, help="output directory (results.json, results.md)")
    p.add_argument("--batch-size", type=int, default=64, help="images / texts per forward")
    p.add_argument("--image-size", type=int, default=None, help="evaluate at this resolution")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--dataset", default=None, help="dataset name for results.json / ids")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast of the forwards (auto: bf16 on CUDA, fp32 on CPU)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate retrieval (recall@k), captioning (COCO metrics) or VQA (accuracy)"
    )
    tasks = p.add_subparsers(dest="task", required=True)

    r = tasks.add_parser(
        "retrieval",
        help="ITC top-k then ITM re-rank; recall@1/5/10 both ways",
        description="BLIP's protocol: ITC similarity for every image-text pair, each query's "
        "top-k candidates re-scored by ITM (positive logit + ITC similarity).",
    )
    _common(r)
    r.add_argument("--k", type=int, default=256, help="candidates re-ranked per query (BLIP: 256)")
    r.add_argument("--itm-batch", type=int, default=128, help="image-text pairs per ITM forward")
    r.add_argument("--max-words", type=int, default=30, help="pre_caption word limit")
    r.set_defaults(func=cmd_eval_retrieval)

    c = tasks.add_parser(
        "caption",
        help="beam search captions scored with pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr)",
    )
    _common(c)
    c.add_argument("--prompt", default="a picture of ", help="generation prompt (BLIP's)")
    c.add_argument("--num-beams", type=int, default=3)
    c.add_argument("--max-length", type=int, default=20, help="tokens, prompt included")
    c.add_argument("--min-length", type=int, default=5, help="tokens, prompt included")
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--spice", action="store_true", help="also SPICE (needs its CoreNLP jar)")
    add_beam_scoring(c)
    c.set_defaults(func=cmd_eval_caption)
    register_vqa(tasks)


def _shared(args: argparse.Namespace) -> dict:
    return {
        "batch_size": args.batch_size, "image_size": args.image_size, "device": args.device,
        "num_workers": args.num_workers, "dataset": args.dataset, "precision": args.precision,
    }  # fmt: skip


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from dlip.distributed import close_process_group
    from dlip.eval.retrieval import run_retrieval_eval

    run_retrieval_eval(
        args.model, args.data, args.images, args.out, k=args.k, itm_batch=args.itm_batch,
        max_words=args.max_words, **_shared(args),
    )  # fmt: skip
    close_process_group()
    return 0


def cmd_eval_caption(args: argparse.Namespace) -> int:
    from dlip.eval.captioning import run_caption_eval

    run_caption_eval(
        args.model, args.data, args.images, args.out, prompt=args.prompt,
        num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
        repetition_penalty=args.repetition_penalty, spice=args.spice,
        beam_scoring=args.beam_scoring, **_shared(args),
    )  # fmt: skip
    return 0


def register_vqa(tasks: argparse._SubParsersAction) -> None:
    q = tasks.add_parser(
        "vqa",
        help="VQA accuracy (the official evaluation) + the result file for the VQAv2 server",
        description="BLIP's VQA inference: rank the answer list (first-token top-k re-scored "
        "by the whole answer) or generate answers by beam search; sharded over torchrun ranks.",
    )
    _common(q)
    q.set_defaults(batch_size=32)
    q.add_argument("--mode", default="rank", choices=["rank", "generate"])
    q.add_argument("--answers", default=None, help="BLIP's answer_list.json (rank mode)")
    q.add_argument("--k-test", type=int, default=128, help="rank: candidates re-scored whole")
    q.add_argument("--num-beams", type=int, default=3)
    q.add_argument("--max-length", type=int, default=10, help="tokens, [DEC] included")
    q.add_argument("--min-length", type=int, default=1)
    q.add_argument("--vg-images", default=None, help="Visual Genome root (BLIP's vg rows)")
    add_beam_scoring(q)
    q.set_defaults(func=cmd_eval_vqa)


def cmd_eval_vqa(args: argparse.Namespace) -> int:
    from dlip.distributed import close_process_group
    from dlip.eval.vqa_eval import run_vqa_eval

    shared = _shared(args)
    shared.pop("dataset")
    run_vqa_eval(
        args.model, args.data, args.images, args.out, mode=args.mode, answers=args.answers,
        k_test=args.k_test, num_beams=args.num_beams, max_length=args.max_length,
        min_length=args.min_length, beam_scoring=args.beam_scoring, vg_images=args.vg_images,
        **shared,
    )  # fmt: skip
    close_process_group()
    return 0
