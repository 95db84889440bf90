"""`caption_3beam` FLOPs: the meta-device composition equals counting a real beam search."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dlip.models.counting import flop_counts
from dlip.models.presets import create_model, get_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _generate_flops(model, caption_len: int, num_beams: int = 3) -> int:
    """Counts `generate` on CPU; the math SDPA path makes the attention matmuls visible."""
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size)
    # min_length = max_length: EOS is masked until the end, so the caption has exactly
    # caption_len tokens whatever the random weights prefer.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.generate(pixels, num_beams=num_beams, max_length=caption_len, min_length=caption_len)
    return counter.get_total_flops()


def test_caption_3beam_matches_a_counted_generate():
    torch.manual_seed(0)
    model = create_model("test_tiny").eval()
    counted = flop_counts(get_config("test_tiny"))
    assert counted["caption_3beam"] == _generate_flops(model, caption_len=20)
    # The count resolves one token: a 19-token caption is fewer FLOPs.
    assert _generate_flops(model, caption_len=19) < counted["caption_3beam"]
    assert counted["caption_token"] > 0 and counted["image_embed"] > 0
