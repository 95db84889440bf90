"""Image preprocessing built from the model's own config (size, mean/std)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dlip.config import ModelConfig


def eval_transform(config: ModelConfig):
    """BLIP's test transform: Resize((S, S), bicubic), no centre crop -> tensor -> Normalize."""
    from torchvision.transforms import v2

    size = config.vision.image_size
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.image_mean), std=list(config.image_std)),
        ]
    )


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; the error names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def preprocess(config: ModelConfig, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, S, S) normalised pixels."""
    tf = eval_transform(config)
    return torch.stack([tf(im) for im in images])
