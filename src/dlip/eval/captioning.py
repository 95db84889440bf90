"""Captioning evaluation as BLIP runs it (salesforce/BLIP train_caption.py, models/blip.py
`generate`): beam search over a Karpathy val/test split, scored with pycocoevalcap as
COCOEvalCap does.

    dlip eval caption --model DIR --data coco_karpathy_test.json --images ROOT --out DIR
    torchrun --nproc_per_node=N -m dlip eval caption ...   (images sharded across ranks)

Generation starts from the prompt ("a picture of "), lengths count the prompt tokens, and the
prompt is stripped from the returned text (`BLIP.generate`). Each rank captions its contiguous
block of images (`shard_range`); rank 0 gathers the (image_id, caption) pairs, de-duplicates
them and checks that every image got exactly one caption.

Scoring follows COCOEvalCap: PTBTokenizer (Java, CoreNLP 3.4.1) on references and predictions,
then Bleu(4), Meteor (Java, meteor-1.5), Rouge and Cider over the predicted images only, values
in pycocoevalcap's scale (fractions; CIDEr ~1.x). SPICE runs only when asked and its CoreNLP
3.6.0 jars are already in pycocoevalcap's spice/lib (it would download them otherwise and fail
offline); otherwise results.json records `"SPICE": null` and the reason.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dlip.data.karpathy import EvalSet
from dlip.models.blip import BLIP

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
PROMPT = "a picture of "
CAPTIONS_JSON = "captions.json"
# SPICE's parser: pycocoevalcap downloads these into spice/lib on first use.
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_HINT = (
    "pycocoevalcap's PTBTokenizer and METEOR need Java ('java' not found on PATH); "
    "install it, e.g. `apt install default-jre-headless`"
)


class JavaNotFoundError(FileNotFoundError):
    """No `java` executable: the tokenizer and METEOR cannot run."""


# ------------------------------------------------------------------------------------ scoring
def require_java() -> str:
    """The java executable pycocoevalcap will start (it calls plain `java`), or a clear error."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(JAVA_HINT)
    return java


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score (empty predictions dict)")
    missing = sorted(set(predictions) - set(references), key=str)
    if missing:
        raise ValueError(
            f"{len(missing)} prediction image id(s) have no references, e.g. {missing[:5]} "
            "(prediction ids must be a subset of the reference ids)"
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction for image {image_id!r} is not a string: {caption!r:.80}")
        refs = references[image_id]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references for image {image_id!r} must be a non-empty list of str")


def _tokenize(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(gts, res) PTB-tokenized, lower-cased, punctuation dropped; only the predicted images.

    The tokenizer writes its temp file into its own package folder and removes it (never cwd).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    ids = list(predictions)
    gts_in = {i: [{"caption": c} for c in references[i]] for i in ids}
    res_in = {i: [{"caption": predictions[i]}] for i in ids}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts_in), tokenizer.tokenize(res_in)
    # The wrapper pairs output lines with ids by position: a lost line would shift everything.
    for name, got, want in (("references", gts, gts_in), ("predictions", res, res_in)):
        if any(len(got.get(i, [])) != len(want[i]) for i in ids):
            raise RuntimeError(f"PTBTokenizer returned the wrong number of {name} lines")
    return gts, res


def close_meteor(meteor: Any) -> None:
    """Stop METEOR's java process now (pycocoevalcap only does it in `__del__`).

    Its `__del__` still runs later and is then harmless: closing a closed pipe and killing a
    reaped process are no-ops.
    """
    proc = meteor.meteor_p
    with meteor.lock:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.kill()
        proc.wait()


_SESSIONS: list[Any] = []  # the Meteor of each open meteor_session(), innermost last


@contextmanager
def _new_meteor() -> Iterator[Any]:
    from pycocoevalcap.meteor.meteor import Meteor

    require_java()
    meteor = Meteor()
    try:
        yield meteor
    finally:
        close_meteor(meteor)


@contextmanager
def meteor_session() -> Iterator[Any]:
    """One METEOR java process for every scoring call inside the block (a fresh one loads its
    paraphrase tables for ~20 s: the demo's six caption evaluations share one)."""
    with _new_meteor() as meteor:
        _SESSIONS.append(meteor)
        try:
            yield meteor
        finally:
            _SESSIONS.remove(meteor)


@contextmanager
def meteor_scorer() -> Iterator[Any]:
    """pycocoevalcap's Meteor, its java subprocess closed on exit (also on error); inside a
    `meteor_session()`, that session's process."""
    if _SESSIONS:
        yield _SESSIONS[-1]
        return
    with _new_meteor() as meteor:
        yield meteor


def _score_tokenized(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    with meteor_scorer() as meteor:
        meteor_score, _ = meteor.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    values = [*bleu, meteor_score, rouge, cider]
    return {name: float(v) for name, v in zip(METRICS, values, strict=True)}


def score_captions(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> dict[str, float]:
    """COCO caption metrics of `predictions` {image_id: caption} against `references`
    {image_id: [captions]}: Bleu_1..4, METEOR, ROUGE_L, CIDEr in pycocoevalcap's scale.

    Only the predicted images are scored (as COCOEvalCap over `loadRes` ids); their ids must be
    a subset of the reference ids. Needs Java (PTBTokenizer, METEOR).
    """
    _check_inputs(predictions, references)
    return _score_tokenized(*_tokenize(predictions, references))


def spice_lib_dir() -> Path:
    import pycocoevalcap.spice.spice as spice_module

    return Path(spice_module.__file__).resolve().parent / "lib"


def spice_skip_reason() -> str | None:
    """Why SPICE cannot run here (None when its CoreNLP jars and java are present)."""
    lib = spice_lib_dir()
    missing = [jar for jar in SPICE_JARS if not (lib / jar).is_file()]
    if missing:
        return (
            f"{', '.join(missing)} not in {lib}: pycocoevalcap would download Stanford CoreNLP "
            "3.6.0 (fails offline); put the jars there to enable SPICE"
        )
    if shutil.which("java") is None:
        return JAVA_HINT
    return None


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float | None, str | None]:
    """(SPICE, None) or (None, why it failed): a SPICE failure must not lose the other metrics."""
    from pycocoevalcap.spice.spice import Spice

    try:
        value, _ = Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError, ValueError) as err:
        return None, f"SPICE failed ({err}); it needs -Xmx8G and breaks on Java 16+"
    return float(value), None


def score_with_spice(
    predictions: dict[str, str], references: dict[str, list[str]], spice: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    """`score_captions` plus SPICE when asked and possible: (metrics, spice record).

    The record is {"requested", "value", "reason"}; metrics gets "SPICE" only when computed.
    """
    _check_inputs(predictions, references)
    gts, res = _tokenize(predictions, references)
    metrics = _score_tokenized(gts, res)
    reason = "not requested (--spice)"
    record: dict[str, Any] = {"requested": spice, "value": None, "reason": reason}
    if spice:
        record["reason"] = spice_skip_reason()
        if record["reason"] is None:
            record["value"], record["reason"] = _spice(gts, res)
        if record["value"] is not None:
            metrics["SPICE"] = record["value"]
        else:
            print(f"SPICE skipped: {record['reason']}", flush=True)
    return metrics, record


# --------------------------------------------------------------------------------- generation
def references_of(eval_set: EvalSet) -> dict[str, list[str]]:
    """{image_id: raw reference captions} (PTBTokenizer does the normalisation)."""
    refs: dict[str, list[str]] = {}
    for image_id, caption_ids in zip(eval_set.image_ids, eval_set.img2txt, strict=True):
        refs.setdefault(image_id, []).extend(eval_set.captions[t] for t in caption_ids)
    return refs


def _local_captions(
    model: BLIP, eval_set: EvalSet, gen: dict[str, Any], batch_size: int, device: torch.device,
    num_workers: int,
) -> list[tuple[str, str]]:  # fmt: skip
    """(image_id, caption) for this rank's block of images."""
    from torch.utils.data import DataLoader, Subset

    from dlip.data.datasets import EvalImageDataset
    from dlip.distributed import shard_range
    from dlip.transforms import eval_transform

    dataset = EvalImageDataset(eval_set, eval_transform(model.config))
    shard = Subset(dataset, list(shard_range(len(dataset))))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    pairs: list[tuple[str, str]] = []
    from dlip.precision import autocast
    from dlip.progress import bar

    with torch.inference_mode(), autocast(device):  # the current precision (precision.using)
        for batch in bar(loader, desc="captions", unit="batch"):
            pixels = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
            pairs.extend(zip(batch["image_id"], model.generate(pixels, **gen), strict=True))
    return pairs


def merge_captions(pairs: list[tuple[str, str]], image_ids: Sequence[str]) -> dict[str, str]:
    """{image_id: caption} in eval-set order: duplicates (padded shards) dropped, and every
    image must have exactly one caption."""
    captions: dict[str, str] = {}
    for image_id, caption in pairs:
        captions.setdefault(str(image_id), caption)
    wanted = dict.fromkeys(image_ids)
    missing = [i for i in wanted if i not in captions]
    extra = [i for i in captions if i not in wanted]
    if missing or extra:
        raise RuntimeError(
            f"gathered captions do not cover the eval set: {len(missing)} image(s) without a "
            f"caption (e.g. {missing[:3]}), {len(extra)} unknown id(s) (e.g. {extra[:3]})"
        )
    return {i: captions[i] for i in wanted}


def evaluate_captions(
    model: BLIP,
    eval_set: EvalSet,
    prompt: str = PROMPT,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    repetition_penalty: float = 1.0,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    spice: bool = False,
    beam_scoring: str = "blip",
) -> dict[str, Any]:
    """Caption every image of `eval_set` (sharded over ranks) and score on rank 0.

    Returns {"metrics", "predictions", "spice", "seconds"}. `metrics` (floats, pycocoevalcap
    scale) reaches every rank, so ranks agree on e.g. the best checkpoint; `predictions`
    {image_id: caption} is filled on rank 0 only ({} elsewhere). Every rank must call it.
    `beam_scoring`: "blip" (BLIP's published numbers) or "hf" (dlip.models.generation).
    """
    from dlip.distributed import broadcast_object, gather_lists, get_rank

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # generation needs BLIP's methods, not DDP's forward
    if not model.config.has_decoder:
        raise ValueError(f"model {model.config.name!r} has no decoder (has_decoder=false)")
    device = next(model.parameters()).device if device is None else torch.device(device)
    gen = dict(prompt=prompt, num_beams=num_beams, max_length=max_length, min_length=min_length,
               repetition_penalty=repetition_penalty, beam_scoring=beam_scoring)  # fmt: skip
    was_training, start = model.training, time.perf_counter()
    model.eval()
    try:
        pairs = _local_captions(model, eval_set, gen, batch_size, device, num_workers)
    finally:
        model.train(was_training)
    gathered = gather_lists(pairs)
    gen_seconds = time.perf_counter() - start
    outcome: dict[str, Any] = {}
    failure: Exception | None = None
    predictions: dict[str, str] = {}
    if get_rank() == 0:
        try:
            predictions = merge_captions(gathered or [], eval_set.image_ids)
            metrics, spice_record = score_with_spice(predictions, references_of(eval_set), spice)
            outcome = {"metrics": metrics, "spice": spice_record}
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            failure, outcome = err, {"error": f"{type(err).__name__}: {err}"}
    shared = broadcast_object(outcome)  # also carries a rank-0 failure, so no rank waits forever
    if failure is not None:
        raise failure
    if "error" in shared:
        raise RuntimeError(f"caption evaluation failed on rank 0: {shared['error']}")
    total = time.perf_counter() - start
    seconds = {"generation": gen_seconds, "scoring": total - gen_seconds, "total": total}
    return {
        "metrics": shared["metrics"],
        "predictions": predictions,
        "spice": shared["spice"],
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------ command
def _markdown(name: str, metrics: Mapping[str, float | None], spice: Mapping[str, Any]) -> str:
    from dlip.eval.common import markdown_table

    shown = {k: 100 * v for k, v in metrics.items() if v is not None}
    lines = [
        "# Captioning",
        "",
        markdown_table({name: shown}, digits=1),
        "",
        "Values x100 (results.json keeps pycocoevalcap's scale: fractions, CIDEr ~1.x).",
    ]
    if spice["value"] is None:
        lines.append(f"SPICE not computed: {spice['reason']}.")
    return "\n".join(lines)


def run_caption_eval(
    model: str,
    data: str,
    images: str,
    out: str | Path,
    *,
    prompt: str = PROMPT,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    repetition_penalty: float = 1.0,
    batch_size: int = 64,
    image_size: int | None = None,
    device: str = "auto",
    num_workers: int = 2,
    dataset: str | None = None,
    spice: bool = False,
    precision: str = "auto",
    beam_scoring: str = "blip",
) -> Path | None:
    """`dlip eval caption`: generate, score, write out/results.json, results.md and
    captions.json; returns the json path on rank 0 (None on other ranks)."""
    import json

    from dlip.data.karpathy import DATASETS, load_eval_set
    from dlip.distributed import is_main_process, setup_device
    from dlip.eval.common import (
        dataset_record,
        describe_model,
        open_model,
        results_record,
        write_results,
    )
    from dlip.fileio import atomic_write_text
    from dlip.models.generation import check_beam_scoring
    from dlip.precision import using

    start = time.perf_counter()
    require_java()  # fail before the (long) generation, not after it
    check_beam_scoring(beam_scoring)
    dev = setup_device(device)
    blip = open_model(model, dev, image_size)
    if not blip.config.has_decoder:
        raise ValueError(
            f"--model {model}: {blip.config.name!r} has no decoder (has_decoder=false, "
            "e.g. a retrieval checkpoint); captioning needs a caption or pretraining checkpoint"
        )
    eval_set = load_eval_set(data, images, dataset=dataset if dataset in DATASETS else None)
    if not eval_set.images:
        raise ValueError(f"{data}: no images to caption")
    gen = {
        "prompt": prompt, "num_beams": num_beams, "max_length": max_length,
        "min_length": min_length, "repetition_penalty": repetition_penalty,
        "beam_scoring": beam_scoring,
    }  # fmt: skip
    settings = {**gen, "image_size": blip.config.vision.image_size, "batch_size": batch_size}
    settings["precision"] = precision
    with using(precision):
        result = evaluate_captions(
            blip, eval_set, **gen, batch_size=batch_size, device=dev, num_workers=num_workers,
            spice=spice,
        )  # fmt: skip
    if not is_main_process():
        return None
    metrics = {**result["metrics"], "SPICE": result["spice"]["value"]}
    predictions = [{"image_id": i, "caption": c} for i, c in result["predictions"].items()]
    record = results_record(
        "caption",
        model=describe_model(model, blip),
        dataset=dataset_record(data, images, dataset, eval_set),
        settings=settings,
        metrics=metrics,
        spice=result["spice"],
        seconds={**result["seconds"], "total": time.perf_counter() - start},
        predictions=predictions,
    )  # fmt: skip
    atomic_write_text(Path(out) / CAPTIONS_JSON, json.dumps(predictions, indent=1) + "\n")
    path = write_results(out, record, _markdown(blip.config.name, metrics, result["spice"]))
    shown = "  ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items() if v is not None)
    print(f"{shown}  (x100)\nwrote {path}", flush=True)
    return path
