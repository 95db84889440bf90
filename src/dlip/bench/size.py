"""Parameters and forward FLOPs of the presets at 224 and 384 px, with ratios to the teacher.

Counting is exact and machine-independent (meta device, torch.utils.flop_counter; conventions
in `dlip.models.counting`); the record still names the machine and versions that produced it.
"""

from __future__ import annotations

from datetime import datetime, timezone

from dlip.fileio import machine
from dlip.models.counting import model_info
from dlip.models.presets import get_config, list_presets

TEACHER = "blip_base"
SIZES = (224, 384)
# DLIP (arXiv 2308.12956): >95% of BLIP's performance with these fractions of its parameters
# and FLOPs, and this speed-up. The paper does not publish its counting or timing protocol.
PUBLISHED = {"params": 0.224, "flops": 0.248, "speedup": 2.7, "source": "arXiv 2308.12956"}


def default_models() -> list[str]:
    """Every shipped preset except the test-only one and the VQA forms."""
    return [n for n in list_presets() if n != "test_tiny" and not get_config(n).vqa]


def ratios(info: dict, teacher: dict) -> dict[str, float]:
    """`group.key` -> info / teacher for every count the teacher has non-zero."""
    return {
        f"{group}.{key}": round(value / teacher[group][key], 4)
        for group in ("params", "flops")
        for key, value in info[group].items()
        if teacher[group].get(key)
    }


def run_size(
    models: list[str] | None = None, sizes: tuple[int, ...] = SIZES, teacher: str = TEACHER
) -> dict:
    """The model_size record: one row per (image size, model), ratios vs `teacher`."""
    rows = []
    for size in sizes:
        ref = model_info(get_config(teacher).with_image_size(size))
        for name in models or default_models():
            # the teacher's row is its reference, counted once (a blip_base count takes seconds)
            info = (
                dict(ref) if name == teacher else model_info(get_config(name).with_image_size(size))
            )
            info["vs_teacher"] = ratios(info, ref)
            rows.append(info)
    return {
        "benchmark": "model_size",
        "teacher": teacher,
        "published": PUBLISHED,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(),
        "models": rows,
    }


def summary(record: dict) -> str:
    """One line per row: total params and image / caption FLOPs with their teacher ratios."""
    lines = []
    for row in record["models"]:
        r, flops = row["vs_teacher"], row["flops"]
        params = row["params"]["total"] / 1e6
        image, caption = flops["image_embed"] / 1e9, flops.get("caption_3beam", 0) / 1e9
        lines.append(
            f"{row['name']:<11}{row['image_size']:>4}px  params {params:7.1f}M"
            f" ({r['params.total']:6.1%})  image {image:7.2f} GFLOPs"
            f" ({r['flops.image_embed']:6.1%})  caption {caption:7.1f} GFLOPs"
            f" ({r.get('flops.caption_3beam', 0):6.1%})"
        )
    return "\n".join(lines)
