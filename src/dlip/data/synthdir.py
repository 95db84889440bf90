"""A synthetic set built once into a run's `data.synth_dir`, and reused only when it is the set
the run asks for.

`synthesize` records its arguments in `synth.json`. A run that finds a complete set
(manifest.jsonl, written last) that an earlier run built there compares them with its own
(`data.synth_images`, `run.seed`, the image size) and refuses another set before step 1,
naming the keys that differ: training on a set of 1000 images after asking for 5000 would
otherwise go unnoticed. A set made by `dlip data synth` (or `synthesize`) and pointed at
with `data.synth_dir` is the user's choice and is used as it is. A set without `synth.json`
(an older dlip) is refused: nothing says what it holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlip.data.synthetic import SETTINGS_FILE, synthesize

RUN_ORIGIN = "data.synth_dir"  # synth.json's `origin` of a set a run built for itself


def wanted(n_images: int, seed: int, image_size: int) -> dict[str, Any]:
    """What a run says about its set: the other arguments of `synthesize` (splits, captions per
    image, ...) are the set's own (`dlip data synth` may choose them), not the run's."""
    return {"n_images": n_images, "seed": seed, "image_size": image_size}


def reuse_problem(out: Path, want: dict[str, Any]) -> str | None:
    """Why the complete set in `out` is not the one `want` describes, or None."""
    fix = f"delete {out} to rebuild it, or point data.synth_dir at another directory"
    try:
        have = json.loads((out / SETTINGS_FILE).read_text())
    except FileNotFoundError:
        return f"data.synth_dir {out} holds a set without {SETTINGS_FILE} (an older dlip): {fix}"
    except (OSError, ValueError) as err:
        return f"data.synth_dir {out}: {SETTINGS_FILE} cannot be read ({err}): {fix}"
    if have.get("origin") != RUN_ORIGIN:
        return None  # built by `dlip data synth` or by hand: the user's set, used as it is
    keys = {"n_images": "data.synth_images", "seed": "run.seed", "image_size": "image size"}
    diff = [
        f"{keys.get(k, k)} {have.get(k)!r} there, {v!r} here"
        for k, v in want.items()
        if have.get(k) != v
    ]
    if not diff:
        return None
    return f"data.synth_dir {out} was built with other settings ({'; '.join(diff)}): {fix}"


def synthesize_once(out_dir: Path | str, n_images: int, seed: int, image_size: int) -> Path:
    """`synthesize` into `out_dir` unless a complete set is there, which must then be the same
    set (`reuse_problem`: a ValueError otherwise). Under torch.distributed rank 0 checks or
    builds and every rank gets its verdict, so all fail together instead of waiting on rank 0.
    Returns `out_dir`."""
    from dlip.distributed import barrier, broadcast_object, is_main_process

    out = Path(out_dir)
    problem = None
    if is_main_process():
        if (out / "manifest.jsonl").is_file():
            problem = reuse_problem(out, wanted(n_images, seed, image_size))
        else:
            synthesize(
                out, n_images, seed=seed, image_size=image_size, overwrite=True, origin=RUN_ORIGIN
            )
    problem = broadcast_object(problem)
    if problem:
        raise ValueError(problem)
    barrier()
    return out
