"""Parity with transformers' BLIP at full blip_base scale (random weights).

    python benchmarks/hf_parity.py [--out benchmarks/results/hf_parity_blip_base.json]
                                   [--only retrieval|captioning|vqa]

The test suite checks parity on tiny models; this script repeats it at BLIP ViT-B/16 + BERT-base
size: HF BlipForImageTextRetrieval and BlipForConditionalGeneration (384 px) and
BlipForQuestionAnswering (480 px, BLIP's VQA size) are built with BLIP's shapes (12 text heads,
ViT LayerNorm eps 1e-6), perturbed, saved, converted with dlip and compared: ITC similarities,
ITM logits, LM logits, VQA question-encoder states and answer-decoder logits (max abs diff) and
greedy / 3-beam caption and answer ids (equal or not; dlip with beam_scoring="hf", the rule
transformers 5.x implements). `--only` re-measures one form and keeps the others' stored
numbers. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dlip.fileio import machine
from dlip.models import vqa
from dlip.models.convert import convert_hf
from dlip.models.generation import generate_ids
from dlip.tokenizer import get_tokenizer

TEXTS = ["a dog running on the beach", "two cats sleeping on a red sofa"]
SEP, DEC, ENC = 102, 30522, 30523


def _hf_pair(cls, config, tmp: Path):
    hf = cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # HF inits the ViT near zero
    hf.save_pretrained(str(tmp / cls.__name__))
    return hf, convert_hf(tmp / cls.__name__)


def _cut(row: list[int]) -> list[int]:
    end = next((i for i in range(1, len(row)) if row[i] == SEP), len(row) - 1)
    return row[: end + 1]


@torch.no_grad()
def retrieval_diffs(hf, ours, pixels, ids, mask) -> dict[str, float]:
    ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
    sims = ours.encode_image(pixels).feat @ ours.encode_text(ids, mask).feat.T
    itm_ids = ids.clone()
    itm_ids[:, 0] = ENC
    ref_itm = hf(input_ids=itm_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True)
    itm = ours.itm_logits(ours.encode_image(pixels).tokens, itm_ids, mask)
    return {
        "itc_max_abs_diff": (sims - ref.itm_score).abs().max().item(),
        "itm_max_abs_diff": (itm - ref_itm.itm_score).abs().max().item(),
    }


@torch.no_grad()
def caption_diffs(hf, ours, pixels, ids, mask) -> dict[str, float | bool]:
    tok = get_tokenizer()
    lm_ids = ids.clone()
    lm_ids[:, 0] = DEC
    ref = hf(pixel_values=pixels, input_ids=lm_ids, attention_mask=mask).logits
    got = ours.lm_logits(ours.encode_image(pixels).tokens, lm_ids, mask)
    real = mask.bool()
    out: dict[str, float | bool] = {"lm_max_abs_diff": (got[real] - ref[real]).abs().max().item()}
    prompt = [DEC, *tok.encode("a picture of")[1:-1]]
    for beams in (1, 3):
        inputs = torch.tensor([[*prompt, SEP]] * pixels.shape[0])
        hf_ids = hf.generate(
            pixel_values=pixels, input_ids=inputs, num_beams=beams, max_length=20, min_length=5
        )
        mine = generate_ids(ours, pixels, "a picture of", beams, 20, 5, 1.0, tok, "hf")
        out[f"ids_equal_beams_{beams}"] = [_cut(r) for r in hf_ids.tolist()] == mine
    return out


QUESTIONS = ["what color is the dog on the beach?", "how many cats are on the red sofa?"]


@torch.no_grad()
def vqa_diffs(hf, ours, pixels) -> dict[str, float | bool]:
    """Equal-length questions: transformers' answer decoder ignores the question mask, dlip
    (as BLIP) applies it, which only matters when questions are padded."""
    tok = get_tokenizer()
    ids, mask = vqa.question_inputs(tok, QUESTIONS)
    assert bool(mask.all()), "the questions must have equal token counts"
    image = hf.vision_model(pixel_values=pixels).last_hidden_state
    ref_q = hf.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image)
    ref_q = ref_q.last_hidden_state
    states = ours.multimodal(ours.encode_image(pixels).tokens, ids, mask).tokens
    a_ids, a_mask = vqa.answer_inputs(tok, ["two", "a brown dog"])
    ref = hf.text_decoder(input_ids=a_ids, attention_mask=a_mask, encoder_hidden_states=ref_q)
    got = vqa.answer_logits(ours, states, mask, a_ids, a_mask)
    out: dict[str, float | bool] = {
        "question_states_max_abs_diff": (states - ref_q).abs().max().item(),
        "answer_logits_max_abs_diff": (got - ref.logits).abs().max().item(),
    }
    for beams in (1, 3):
        hf_ids = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                             num_beams=beams, max_length=10, min_length=1)  # fmt: skip
        mine = vqa.generate_answer_ids(ours, states, mask, tok, beams, 10, 1, "hf")
        out[f"answer_ids_equal_beams_{beams}"] = [_cut(r) for r in hf_ids.tolist()] == mine
    return out


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/hf_parity_blip_base.json")
    parser.add_argument("--only", choices=["retrieval", "captioning", "vqa"], default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    forms = [args.only] if args.only else ["retrieval", "captioning", "vqa"]
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.only and out.is_file() else {}
    result |= {"benchmark": "hf_parity", "model": "blip_base (random weights)"}
    batch = get_tokenizer()(TEXTS, max_length=35)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with tempfile.TemporaryDirectory() as tmp:
        for form in forms:
            size = 480 if form == "vqa" else 384
            config = transformers.BlipConfig(
                text_config=dict(num_attention_heads=12),
                vision_config=dict(image_size=size, layer_norm_eps=1e-6),
            )
            pixels = torch.randn(2, 3, size, size)
            if form == "retrieval":
                hf, ours = _hf_pair(transformers.BlipForImageTextRetrieval, config, Path(tmp))
                result[form] = retrieval_diffs(hf, ours, pixels, ids, mask)
            elif form == "captioning":
                hf, ours = _hf_pair(transformers.BlipForConditionalGeneration, config, Path(tmp))
                result[form] = caption_diffs(hf, ours, pixels, ids, mask)
            else:
                hf, ours = _hf_pair(transformers.BlipForQuestionAnswering, config, Path(tmp))
                result[form] = vqa_diffs(hf, ours, pixels)
            result[form]["image_size"] = size
            del hf, ours
    result["transformers"] = transformers.__version__
    result["machine"] = machine()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
