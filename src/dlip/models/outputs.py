"""Output records and layer taps shared by the vision and text towers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Taps:
    """Layers whose hidden states / attention probabilities a forward should return.

    Indices are 0-based layer numbers of the tower; negative indices count back from the last
    layer the call runs (so -1 in `encode_text` of a `fusion_layers=k` model is the last
    text-only layer). Asking for a layer the call does not run is an IndexError. Attention
    probabilities are computed outside SDPA only for the layers asked for, so an empty `Taps`
    costs nothing.
    """

    hidden: frozenset[int] = frozenset()
    attn: frozenset[int] = frozenset()

    @staticmethod
    def of(taps: Taps | Iterable[int] | None) -> Taps:
        """None -> no taps; an iterable of ints -> hidden states and attention of those layers."""
        if taps is None:
            return NO_TAPS
        if isinstance(taps, Taps):
            return taps
        layers = frozenset(int(i) for i in taps)
        return Taps(hidden=layers, attn=layers)

    def resolve(self, layers: range) -> Taps:
        """Map negative indices into `layers` (those the call runs) and reject any outside it."""
        return Taps(_resolve(self.hidden, layers), _resolve(self.attn, layers))


NO_TAPS = Taps()


def _resolve(taps: frozenset[int], layers: range) -> frozenset[int]:
    out = set()
    for i in taps:
        j = layers.stop + i if i < 0 else i
        if j not in layers:
            raise IndexError(f"tap layer {i} is not among the layers this call runs ({layers})")
        out.add(j)
    return frozenset(out)


@dataclass
class ImageOutput:
    tokens: Tensor  # (B, 1+N, Dv) vision tokens after the final norm; [:, 0] is CLS
    feat: Tensor | None  # (B, E) L2-normalised vision_proj(CLS); None without an ITC head
    hidden: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, 1+N, Dv), pre-norm
    attn: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, H, 1+N, 1+N)


@dataclass
class TextOutput:
    tokens: Tensor  # (B, T, Dt) last hidden states of the layers run
    feat: Tensor | None = None  # (B, E) L2-normalised text_proj(CLS) for unimodal text
    hidden: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, T, Dt)
    attn: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, H, T, T_keys)
    cross_attn: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, H, T, N_image)
