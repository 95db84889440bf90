"""Image preprocessing built from the model's own config (size, mean/std), as BLIP does it.

Train (BLIP `transform_train`): RandomResizedCrop(S, scale=(min_scale, 1), bicubic) ->
RandomHorizontalFlip -> RandomAugment(N=2, M=5) -> float -> Normalize. `min_scale` is 0.2 for
pretraining and 0.5 for finetuning. Eval: Resize((S, S), bicubic), no centre crop -> Normalize.

RandomAugment follows BLIP's OpenCV `transform/randaugment.py` with torchvision v2 functional
ops (run on PIL images, bilinear like cv2.warpAffine): each of N ops is drawn with replacement
from `RAND_AUGMENT_OPS` and applied with probability 0.5 at level M/10: rotate +-30*M/10
degrees, shear +-0.3*M/10, translate +-10*M/10 pixels (absolute, whatever the image size, as in
BLIP), grey fill 128; Brightness and Sharpness use the enhance factor 1.8*M/10 + 0.1, which is
exactly 1 (a no-op) at BLIP's M=5.
All randomness comes from torch's global RNG, so DataLoader worker seeding covers it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

if TYPE_CHECKING:  # type hints only: transforms sit below the model package
    from dlip.models.config import ModelConfig

RAND_AUGMENT_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10
FILL = 128  # grey for the pixels geometric ops uncover, as BLIP's replace_value
TRANSLATE_PIXELS = 10.0  # BLIP's translate_const: pixels at level MAX_LEVEL
PRETRAIN_MIN_SCALE = 0.2
FINETUNE_MIN_SCALE = 0.5

_BICUBIC = v2.InterpolationMode.BICUBIC
_BILINEAR = v2.InterpolationMode.BILINEAR  # cv2.warpAffine's default, which BLIP uses


def op_strength(name: str, magnitude: float) -> float:
    """The unsigned strength BLIP's level_to_args gives op `name` at level `magnitude`."""
    level = magnitude / MAX_LEVEL
    if name in ("Brightness", "Sharpness"):
        return level * 1.8 + 0.1  # enhance factor; 1.0 means unchanged
    if name in ("ShearX", "ShearY"):
        return level * 0.3  # shear factor (tan of the shear angle)
    if name in ("TranslateX", "TranslateY"):
        return level * TRANSLATE_PIXELS
    if name == "Rotate":
        return level * 30.0  # degrees
    if name in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    raise ValueError(f"unknown RandomAugment op {name!r}; known: {', '.join(RAND_AUGMENT_OPS)}")


ImageLike = torch.Tensor | Image.Image  # uint8 (3, H, W) tensor or RGB PIL image


def _affine(img: ImageLike, translate: Sequence[float], shear: Sequence[float]) -> ImageLike:
    # center (0.5, 0.5) is the centre of pixel (0, 0): cv2's origin, so shears keep row / column
    # 0 fixed exactly as BLIP's warpAffine matrices do.
    return F.affine(
        img,
        angle=0.0,
        translate=list(translate),
        scale=1.0,
        shear=list(shear),
        interpolation=_BILINEAR,
        fill=FILL,
        center=[0.5, 0.5],
    )


def is_noop(name: str, magnitude: float) -> bool:
    """Whether op `name` leaves every image unchanged at this level (Identity; enhance at 1.0)."""
    return name == "Identity" or (
        name in ("Brightness", "Sharpness") and op_strength(name, magnitude) == 1.0
    )


def apply_op(img: ImageLike, name: str, magnitude: float = 5, sign: int = 1) -> ImageLike:
    """One RandomAugment op on a uint8 (3, H, W) tensor or a PIL image; `sign` (+1/-1) is the
    direction of geometric ops. The output has the input's type."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign}")
    strength = op_strength(name, magnitude)
    if is_noop(name, magnitude):
        return img
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Brightness":
        return F.adjust_brightness(img, strength)
    if name == "Sharpness":
        return F.adjust_sharpness(img, strength)
    # torchvision's shear angle s maps x -> x - tan(s) * y; BLIP's factor f maps x -> x + f * y.
    signed = sign * strength  # geometric ops go either way, as BLIP's random sign
    if name == "ShearX":
        return _affine(img, (0, 0), (-math.degrees(math.atan(signed)), 0.0))
    if name == "ShearY":
        return _affine(img, (0, 0), (0.0, -math.degrees(math.atan(signed))))
    if name == "TranslateX":  # BLIP moves the content by -offset
        return _affine(img, (-signed, 0), (0.0, 0.0))
    if name == "TranslateY":
        return _affine(img, (0, -signed), (0.0, 0.0))
    return F.rotate(img, signed, interpolation=_BILINEAR, fill=FILL)  # Rotate, about the centre


class RandomAugment:
    """BLIP's RandomAugment on uint8 (3, H, W) tensors or PIL images; see the module docstring.

    A tensor goes through PIL for the ops (when any op acts): PIL's uint8 affine, equalize and
    autocontrast run several times faster than torchvision's float tensor kernels, and the two
    conversions cost well under a millisecond.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 5,
        ops: Sequence[str] = RAND_AUGMENT_OPS,
        prob: float = 0.5,
    ) -> None:
        if not ops:
            raise ValueError("RandomAugment needs at least one op")
        for name in ops:
            op_strength(name, magnitude)  # fails early on an unknown name
        self.num_ops, self.magnitude, self.ops, self.prob = num_ops, magnitude, tuple(ops), prob

    def sample(self) -> list[tuple[str, int]]:
        """The (op, sign) pairs one call applies: N draws with replacement, each kept w.p. prob."""
        picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        keep = (torch.rand(self.num_ops) < self.prob).tolist()
        signs = torch.where(torch.rand(self.num_ops) < 0.5, -1, 1).tolist()
        return [(self.ops[i], s) for i, k, s in zip(picks, keep, signs, strict=True) if k]

    def __call__(self, img: ImageLike) -> ImageLike:
        if isinstance(img, torch.Tensor) and img.dtype != torch.uint8:
            raise TypeError(f"RandomAugment expects a uint8 image tensor, got {img.dtype}")
        ops = [(name, sign) for name, sign in self.sample() if not is_noop(name, self.magnitude)]
        if not ops:
            return img
        out = F.to_pil_image(img) if isinstance(img, torch.Tensor) else img
        for name, sign in ops:
            out = apply_op(out, name, self.magnitude, sign)
        if not isinstance(img, torch.Tensor):
            return out
        out = F.pil_to_tensor(out)  # uint8 (3, H, W)
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.TVTensor) else out

    def __repr__(self) -> str:
        return f"RandomAugment(N={self.num_ops}, M={self.magnitude}, p={self.prob})"


def _normalize(config: ModelConfig) -> list[v2.Transform]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(config.image_mean), std=list(config.image_std)),
    ]


def train_transform(
    config: ModelConfig,
    min_scale: float = FINETUNE_MIN_SCALE,
    rand_augment: bool = True,
    hflip: bool = True,
) -> v2.Compose:
    """BLIP's train transform: PIL image or uint8 tensor -> float (3, S, S) normalised pixels.

    `min_scale`: smallest crop area fraction (0.2 pretraining, 0.5 finetuning).
    `hflip`: BLIP flips half the images. Turn it off when captions name left and right (the
    synthetic data's spatial relations): a flipped image makes "a circle left of a square" false.
    """
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    size = config.vision.image_size
    steps: list = [
        v2.ToImage(),  # uint8 (3, H, W): v2 ops run faster on tensors than on PIL here
        v2.RandomResizedCrop(
            (size, size), scale=(min_scale, 1.0), interpolation=_BICUBIC, antialias=True
        ),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if rand_augment:
        steps.append(RandomAugment())
    return v2.Compose(steps + _normalize(config))


def eval_transform(config: ModelConfig) -> v2.Compose:
    """BLIP's test transform: Resize((S, S), bicubic), no centre crop -> tensor -> Normalize."""
    size = config.vision.image_size
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((size, size), interpolation=_BICUBIC, antialias=True),
            *_normalize(config),
        ]
    )


def load_image(path: str | Path) -> Image.Image:
    """An image file as upright 8-bit RGB (`dlip.images.decode_rgb`); the error names the file."""
    from dlip.images import decode_rgb

    try:
        return decode_rgb(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def preprocess(config: ModelConfig, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, S, S) normalised pixels."""
    tf = eval_transform(config)
    return torch.stack([tf(im) for im in images])
