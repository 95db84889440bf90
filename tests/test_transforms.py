"""Image transforms: BLIP's train / eval pipelines and each RandomAugment op, on tiny images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

import dlip
from dlip.models.config import CLIP_MEAN, CLIP_STD
from dlip.transforms import (
    RAND_AUGMENT_OPS,
    RandomAugment,
    apply_op,
    eval_transform,
    is_noop,
    op_strength,
    preprocess,
    train_transform,
)

torch.set_num_threads(1)
PHOTOS = Path(dlip.__file__).parent / "assets" / "photos"
SIZE = 32  # test_tiny's image size


@pytest.fixture(scope="module")
def config():
    return dlip.get_config("test_tiny")


@pytest.fixture(scope="module")
def raw_config(config):
    """Mean 0 / std 1: transform outputs are pixel / 255, so positions can be read back."""
    return config.replace(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    with Image.open(PHOTOS / "chelsea.jpg") as im:
        small = im.convert("RGB").resize((40, 21), Image.BICUBIC)  # W 40, H 21: shear shift 3
    return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _ramp(width: int = 256, height: int = 256) -> torch.Tensor:
    """uint8 (3, H, W): R = x, G = y (the pixel's own coordinates), B = 0."""
    x = torch.arange(width).expand(height, width)
    y = torch.arange(height)[:, None].expand(height, width)
    return torch.stack([x, y, torch.zeros_like(x)]).clamp(max=255).to(torch.uint8)


def test_eval_transform_exact_size_and_normalisation(config):
    white = Image.new("RGB", (50, 30), (255, 255, 255))  # non-square: no crop, just resize
    out = eval_transform(config)(white)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)
    batch = preprocess(config, [white, white.rotate(90, expand=True)])
    assert batch.shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("rand_augment", [False, True])
def test_train_transform_shape_dtype_and_mean_maps_to_zero(config, rand_augment):
    mean_rgb = tuple(round(m * 255) for m in CLIP_MEAN)
    image = Image.new("RGB", (64, 48), mean_rgb)
    torch.manual_seed(0)
    tf = train_transform(config, rand_augment=rand_augment)
    for _ in range(10):
        out = tf(image)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        if not rand_augment:  # geometric augment ops bring in grey 128, which is not the mean
            assert out.abs().max() < 0.01  # only uint8 rounding of the mean is left


def _crop_area_and_ratio(out: torch.Tensor) -> tuple[float, float]:
    # out: (3, S, S) = ramp / 255. Output column j samples x = x0 + (j + 0.5) * w / S - 0.5, so
    # the first and last columns are (S - 1) / S * w apart; the same for rows and h.
    s = out.shape[-1]
    w = (out[0, s // 2, -1] - out[0, s // 2, 0]).item() * 255 * s / (s - 1)
    h = (out[1, -1, s // 2] - out[1, 0, s // 2]).item() * 255 * s / (s - 1)
    return w * h / 256**2, w / h


@pytest.mark.parametrize("min_scale", [0.2, 0.5])
def test_random_resized_crop_respects_scale_and_ratio(raw_config, min_scale):
    tf = train_transform(raw_config, min_scale=min_scale, rand_augment=False, hflip=False)
    torch.manual_seed(1)
    stats = [_crop_area_and_ratio(tf(_ramp())) for _ in range(300)]
    areas = [a for a, _ in stats]
    ratios = [r for _, r in stats]
    assert min(areas) > min_scale - 0.03 and max(areas) < 1.03
    assert min(areas) < min_scale + 0.1  # the lower bound is actually reached
    assert min(ratios) > 0.75 - 0.05 and max(ratios) < 4 / 3 + 0.05


def _flipped(out: torch.Tensor) -> bool:
    return bool(out[0, SIZE // 2, 0] > out[0, SIZE // 2, -1])  # R (= x) decreasing


def test_hflip_option(raw_config):
    torch.manual_seed(2)
    no_flip = train_transform(raw_config, rand_augment=False, hflip=False)
    assert not any(_flipped(no_flip(_ramp())) for _ in range(100))
    flip = train_transform(raw_config, rand_augment=False, hflip=True)
    n = sum(_flipped(flip(_ramp())) for _ in range(200))
    assert 70 < n < 130  # p = 0.5


def test_blip_levels_at_magnitude_5():
    assert op_strength("Rotate", 5) == 15.0
    assert op_strength("ShearX", 5) == op_strength("ShearY", 5) == 0.15
    assert op_strength("TranslateX", 5) == op_strength("TranslateY", 5) == 5.0
    assert op_strength("Brightness", 5) == op_strength("Sharpness", 5) == 1.0
    with pytest.raises(ValueError, match="unknown RandomAugment op 'Solarise'"):
        op_strength("Solarise", 5)


def _op(img: torch.Tensor, kind: str, name: str, magnitude: float = 5, sign: int = 1):
    """apply_op on the tensor itself or on it as a PIL image; the result as a uint8 tensor."""
    if kind == "tensor":
        out = apply_op(img, name, magnitude, sign)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
        return out
    out = apply_op(TF.to_pil_image(img), name, magnitude, sign)
    assert isinstance(out, Image.Image)
    return TF.pil_to_tensor(out)


KINDS = pytest.mark.parametrize("kind", ["tensor", "pil"])


@KINDS
@pytest.mark.parametrize("name", ["Identity", "Brightness", "Sharpness"])
def test_ops_that_are_no_ops_at_magnitude_5(photo, kind, name):
    assert is_noop(name, 5)
    assert torch.equal(_op(photo, kind, name, 5), photo)


@KINDS
@pytest.mark.parametrize("name", ["Brightness", "Sharpness"])
def test_enhance_ops_act_at_other_magnitudes(photo, kind, name):
    assert not is_noop(name, 8)
    assert not torch.equal(_op(photo, kind, name, 8), photo)


@KINDS
@pytest.mark.parametrize(
    "name", ["AutoContrast", "Equalize", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]
)
@pytest.mark.parametrize("sign", [1, -1])
def test_other_ops_change_the_image(photo, kind, name, sign):
    assert not is_noop(name, 5)
    out = _op(photo, kind, name, 5, sign)
    assert out.shape == photo.shape and not torch.equal(out, photo)


@KINDS
def test_autocontrast_and_equalize_stretch_a_dull_image(photo, kind):
    dull = photo // 2 + 64  # values in [64, 191]
    stretched = _op(dull, kind, "AutoContrast")
    assert stretched.amin(dim=(1, 2)).tolist() == [0, 0, 0]
    assert stretched.amax(dim=(1, 2)).min() >= 254  # (max - min) * 255 / (max - min), truncated
    equalized = _op(dull, kind, "Equalize")
    assert not torch.equal(equalized, dull) and equalized.max() == 255


@KINDS
def test_shear_keeps_the_origin_row_and_shifts_the_last(photo, kind):
    h = photo.shape[1]  # 21: the last row moves by 0.15 * 20 = 3 pixels
    out = _op(photo, kind, "ShearX", 5, sign=1)
    assert torch.equal(out[:, 0], photo[:, 0])
    assert (out[:, h - 1, 4:-1].int() - photo[:, h - 1, 1:-4].int()).abs().max() <= 1
    assert (out[:, h - 1, :2] == 128).all()  # uncovered: grey
    tall = photo.transpose(1, 2).contiguous()
    out_y = _op(tall, kind, "ShearY", 5, sign=1)
    assert torch.equal(out_y[:, :, 0], tall[:, :, 0])
    assert (out_y[:, 4:-1, h - 1].int() - tall[:, 1:-4, h - 1].int()).abs().max() <= 1


@KINDS
def test_translate_moves_5_pixels_with_grey_fill(photo, kind):
    out = _op(photo, kind, "TranslateX", 5, sign=1)  # BLIP: content moves left by the offset
    assert torch.equal(out[:, :, :-5], photo[:, :, 5:])
    assert (out[:, :, -5:] == 128).all()
    out = _op(photo, kind, "TranslateY", 5, sign=-1)
    assert torch.equal(out[:, 5:], photo[:, :-5])
    assert (out[:, :5] == 128).all()


@KINDS
def test_rotate_15_degrees_about_the_centre(kind):
    square = _ramp(33, 33)
    for sign in (1, -1):
        out = _op(square, kind, "Rotate", 5, sign)
        assert (out[:, 0, 0] == 128).all()  # a corner leaves the frame: grey fill
        assert (out[:2, 16, 16].int() - square[:2, 16, 16].int()).abs().max() <= 1  # centre stays
        # the pixel 10 px right of the centre lands 10 px away at +-15 degrees
        y = 16 - sign * 10 * math.sin(math.radians(15))
        x = 16 + 10 * math.cos(math.radians(15))
        assert (out[0, round(y), round(x)].int() - 26).abs() <= 1


def test_random_augment_sampling_matches_blip():
    torch.manual_seed(3)
    aug = RandomAugment()  # N=2, M=5, p=0.5, sampled with replacement
    draws = [aug.sample() for _ in range(3000)]
    counts = [len(d) for d in draws]
    assert abs(sum(counts) / len(counts) - 1.0) < 0.05  # 2 ops x p 0.5
    assert any(len(d) == 2 and d[0][0] == d[1][0] for d in draws)  # with replacement
    picks = [name for d in draws for name, _ in d]
    for name in RAND_AUGMENT_OPS:
        assert abs(picks.count(name) / len(picks) - 0.1) < 0.02
    signs = [s for d in draws for _, s in d]
    assert abs(sum(signs)) < 0.1 * len(signs)
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.zeros(3, 8, 8))


def test_random_augment_same_result_for_tensor_and_pil(photo):
    aug, changed = RandomAugment(), 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = aug(tv_tensors.Image(photo))
        assert type(out) is tv_tensors.Image
        torch.manual_seed(seed)
        assert torch.equal(out, TF.pil_to_tensor(aug(TF.to_pil_image(photo))))
        changed += not torch.equal(out, photo)
    assert 4 < changed < 20  # no acting op in (1 - 0.5 * 0.7) ** 2 = 42% of calls


def test_bad_arguments_are_errors(config):
    with pytest.raises(ValueError, match="min_scale"):
        train_transform(config, min_scale=0.0)
    with pytest.raises(ValueError, match="unknown RandomAugment op"):
        RandomAugment(ops=["Identity", "Blur"])
