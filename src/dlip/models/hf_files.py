"""The files beside an HF export's weights that the hub ecosystem expects.

`dlip convert --to hf` writes transformers' BLIP classes (`dlip.models.convert.export_hf`); this
module adds what `AutoProcessor.from_pretrained`, `pipeline("image-to-text", ...)` and the hub's
model page read: the processor (BLIP's image processor with the model's size, mean and std +
bert-base-uncased WordPiece with BLIP's `[DEC]` / `[ENC]` tokens), a generation config with
BLIP's caption settings (salesforce/BLIP models/blip.py `generate`: 3 beams, max_length 20,
min_length 5, repetition penalty 1.0; answers: max_length 10) and a model card (README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlip.models.config import ModelConfig

# BLIP's decoding defaults: captions (models/blip.py BLIP_Decoder.generate, beam search) and
# answers (models/blip_vqa.py BLIP_VQA forward, inference="generate").
GENERATION = {
    "captioning": {"num_beams": 3, "max_length": 20, "min_length": 5, "repetition_penalty": 1.0},
    "vqa": {"num_beams": 3, "max_length": 10, "min_length": 1},
}

PIPELINE_TAGS = {"captioning": "image-to-text", "vqa": "visual-question-answering"}


def write_processor(config: ModelConfig, out: Path) -> None:
    """`BlipProcessor` files: dlip's eval transform (bicubic resize to S x S, no crop, [0, 1],
    the model's mean / std) and dlip's tokenizer (vendored vocab, `[DEC]` 30522, `[ENC]` 30523)."""
    import transformers

    from dlip.tokenizer import DEC, ENC, default_vocab_path, get_tokenizer

    size = config.vision.image_size
    images = transformers.BlipImageProcessor(
        size={"height": size, "width": size},
        resample=3,  # PIL.Image.BICUBIC, as dlip.transforms.eval_transform
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        do_convert_rgb=True,
    )
    # transformers 5.x reads `vocab` (a path or dict); a wrong one maps every word to [UNK],
    # so the ids are checked against dlip's own below.
    text = transformers.BertTokenizer(
        vocab=str(default_vocab_path()),
        do_lower_case=True,
        bos_token=DEC,
        additional_special_tokens=[ENC],
        model_max_length=config.text.max_position_embeddings,
    )
    ours, sample = get_tokenizer(), "a dog on a red sofa"
    want = [ours.encode(sample), [ours.dec_token_id, ours.enc_token_id]]
    got = [text(sample)["input_ids"], text.convert_tokens_to_ids([DEC, ENC])]
    if got != want:
        raise RuntimeError(f"the exported tokenizer gives ids {got}, dlip's {want}")
    transformers.BlipProcessor(image_processor=images, tokenizer=text).save_pretrained(str(out))


def write_generation_config(form: str, out: Path) -> None:
    """generation_config.json: BLIP's beam-search settings of `form` and its special ids."""
    import transformers

    from dlip.tokenizer import Tokenizer

    transformers.GenerationConfig(
        **GENERATION[form],
        bos_token_id=Tokenizer.dec_token_id,
        eos_token_id=Tokenizer.sep_token_id,
        pad_token_id=Tokenizer.pad_token_id,
    ).save_pretrained(str(out))


def read_results(path: str | Path) -> dict[str, Any]:
    """A `dlip eval` / `dlip finetune` results.json, with a clear error when it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--results {path}: cannot read a results.json ({err})") from err
    if not isinstance(record, dict) or "task" not in record:
        raise ValueError(f"--results {path}: no 'task' field; pass the results.json of `dlip eval`")
    return record


def _metric_rows(record: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(protocol, metric, value) of every numeric metric in a results record."""
    rows = []
    for key, label in (("metrics", "ITC + ITM re-rank"), ("metrics_itc", "ITC only")):
        block = record.get(key)
        if isinstance(block, dict):
            name = label if record.get("task") == "retrieval" else record["task"]
            rows += [(name, k, v) for k, v in block.items() if isinstance(v, int | float)]
    if isinstance(record.get("overall"), int | float):
        rows.append(("vqa", "accuracy", record["overall"]))
    return rows


def model_card(
    config: ModelConfig,
    form: str,
    cls_name: str,
    params: int,
    temperature: float | None,
    source: str,
    results: list[dict[str, Any]],
    license_id: str,
) -> str:
    """README.md of an export: what the model is, how it was made, its metrics, its license."""
    v, t = config.vision, config.text
    tags = ["blip", "dlip", "knowledge-distillation", f"image-text-{form}"]
    head = ["---", f"license: {license_id}", "library_name: transformers"]
    if form in PIPELINE_TAGS:
        head.append(f"pipeline_tag: {PIPELINE_TAGS[form]}")
    head += ["tags:", *[f"- {tag}" for tag in tags], "---", ""]
    body = [
        f"# {config.name} ({form})",
        "",
        f"A BLIP-class model (Li et al., 2022, arXiv 2201.12086) exported by dlip as transformers' "
        f"`{cls_name}`: ViT with {v.depth} layers of width {v.width} at {v.image_size} px "
        f"(patch {v.patch_size}), BERT text model with {t.num_layers} layers of width "
        f"{t.hidden_size}, {params / 1e6:.1f}M parameters in this form.",
        "",
        "## How it was made",
        "",
        f"Exported with `dlip convert {source} --to hf` from the dlip model directory `{source}` "
        "(dlip: BLIP distillation in the manner of DLIP, arXiv 2308.12956). Every weight of the "
        "form was placed (the export fails on any tensor left over)"
        + (
            "."
            if temperature is None
            else f"; only BLIP's learned ITC temperature (here {temperature:.4f}) has no place "
            "in transformers' classes."
        ),
        "",
        "## Evaluation",
        "",
    ]
    body += _results_section(results)
    body += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoProcessor, " + cls_name,
        'processor = AutoProcessor.from_pretrained("THIS_DIR")',
        f'model = {cls_name}.from_pretrained("THIS_DIR")',
        "```",
        "",
        _usage_note(form),
        "",
        "## License",
        "",
        f"`{license_id}`. dlip itself is Apache-2.0; weights distilled from or initialised with "
        "Salesforce's BLIP checkpoints also fall under BLIP's BSD-3-Clause license.",
        "",
    ]
    return "\n".join(head + body)


def _results_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return ["No evaluation was given to the export (`dlip convert --results FILE`).", ""]
    lines = ["| task | data | protocol | metric | value |", "|---|---|---|---|---|"]
    for record in results:
        data = record.get("dataset") or record.get("split") or "-"
        for protocol, metric, value in _metric_rows(record):
            lines.append(f"| {record['task']} | {data} | {protocol} | {metric} | {value:.2f} |")
    machines = sorted({str(r.get("machine", "-")) for r in results})
    return [*lines, "", f"Measured by `dlip eval` on: {'; '.join(machines)}.", ""]


def _usage_note(form: str) -> str:
    if form == "captioning":
        return (
            'Captions as BLIP makes them: `inputs = processor(images=image, text="a picture of", '
            'return_tensors="pt")`, then `model.generate(**inputs, num_beams=3, max_length=20, '
            "min_length=5)`: transformers' BLIP `generate` does not pass generation_config.json "
            "on to its text decoder, so give the settings explicitly (without them it decodes "
            'greedily). `pipeline("image-text-to-text", model="THIS_DIR")` ("image-to-text" '
            'before transformers 5) takes `text="a picture of"` and the same `generate_kwargs`.'
        )
    if form == "retrieval":
        return (
            "`model(**processor(images=..., text=...), use_itm_head=False).itm_score` gives ITC "
            "cosine similarities; for BLIP's ITM score set `input_ids[:, 0]` to the `[ENC]` id "
            "(30523) first, as BLIP's ITM was trained."
        )
    return "`model.generate(**processor(images=image, text=question))` answers a question."
