"""Bad samples never end a run: every per-sample failure is a counted skip with its reason, and
a batch that skipping leaves too small is skipped (consumed, not trained on) on every rank."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlip.cli.train import finetune_main, pretrain_main
from dlip.data.common import BadSample, decode_image, read_manifest, write_manifest
from dlip.data.shards import read_shard_index, write_shards
from dlip.data.synthetic import synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


def _bomb() -> bytes:
    """A small PNG that declares 200 megapixels: PIL refuses it in open()."""
    buf = io.BytesIO()
    Image.new("L", (20_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_paths(root: Path) -> dict[str, Path]:
    """One path per way a file can fail to be read, with the reason it must be counted as."""
    (root / "file.jpg").write_bytes(b"not a directory")
    loop = root / "loop.jpg"
    os.symlink(loop, loop)  # ELOOP
    (root / "bomb.png").write_bytes(_bomb())
    return {
        "missing_file": root / "file.jpg" / "under_a_file.jpg",  # ENOTDIR
        "unreadable_file": loop,
        "too_large": root / "bomb.png",
    }


def test_every_os_error_and_a_decompression_bomb_are_counted_skips(tmp_path):
    for reason, path in _bad_paths(tmp_path).items():
        with pytest.raises(BadSample) as err:
            decode_image(path)
        assert err.value.reason == reason, path
    with pytest.raises(BadSample) as err:
        decode_image(tmp_path / ("x" * 300 + ".jpg"))  # ENAMETOOLONG
    assert err.value.reason == "unreadable_file" and "ENAMETOOLONG" in str(err.value)
    with pytest.raises(BadSample) as err:
        decode_image(_bomb())
    assert err.value.reason == "too_large"


def test_sharding_goes_past_every_bad_row(tmp_path):
    synth = tmp_path / "synth"
    synthesize(synth, 12, seed=0, image_size=32, n_val=1, n_test=1)
    good = list(read_manifest(synth / "manifest.jsonl"))[:4]
    bad = [{**good[0], "image": str(p)} for p in _bad_paths(tmp_path).values()]
    write_manifest([good[0], *bad, *good[1:]], tmp_path / "m.jsonl")
    write_shards(tmp_path / "m.jsonl", tmp_path / "shards", shard_size=2)
    index = read_shard_index(tmp_path / "shards")
    assert index["samples"] == 4
    assert index["skipped"] == {"missing_file": 1, "too_large": 1, "unreadable_file": 1}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_survives_batches_that_skipping_empties(tmp_path):
    """Good and missing images alternate, batch 2: batches of 1 (too few for ITM) and 0 occur;
    they are skipped on every rank, and the counts are logged by reason."""
    synth = tmp_path / "synth"
    synthesize(synth, 14, seed=0, image_size=32, n_val=1, n_test=1)
    rows = list(read_manifest(synth / "manifest.jsonl"))
    mixed = [r for row in rows for r in (row, {**row, "image": str(tmp_path / "gone.jpg")})]
    write_manifest(mixed, tmp_path / "mixed.jsonl")
    run_dir = tmp_path / "run"
    args = {
        "run_dir": run_dir, "max_steps": 3, "model.preset": "test_tiny",
        "data.manifests": f"[{tmp_path / 'mixed.jsonl'}]", "data.batch_size": 2,
        "data.num_workers": 0, "data.hflip": "false", "data.rand_augment": "false",
        "loss.queue_size": 16, "run.log_every": 1, "run.device": "cpu",
    }  # fmt: skip
    assert pretrain_main([f"{k}={v}" for k, v in args.items()]) == 0
    logged = _rows(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert logged[-1]["skipped_missing_file"] >= 3  # a skipped step's batch held at least one
    assert logged[-1]["skipped"] == logged[-1]["skipped_missing_file"]


def test_finetuning_survives_bad_training_images(tmp_path):
    synth = tmp_path / "synth"
    synthesize(synth, 12, seed=0, image_size=32, captions_per_image=1, n_val=2, n_test=2)
    train = json.loads((synth / "train.json").read_text())
    for row in train[:2]:  # 2 of 8 training images: present but not images
        (synth / row["image"]).write_bytes(b"\x00garbage")
    run_dir = tmp_path / "ft"
    args = {
        "run_dir": run_dir, "model.preset": "test_tiny", "data.synth_dir": synth,
        "data.batch_size": 2, "data.num_workers": 0, "data.hflip": "false",
        "data.rand_augment": "false", "loss.momentum_distill": "false", "run.epochs": 1,
        "run.log_every": 1, "run.device": "cpu", "eval.k_test": 2, "eval.batch_size": 4,
    }  # fmt: skip
    assert finetune_main(["retrieval", *(f"{k}={v}" for k, v in args.items()), "--no-test"]) == 0
    steps = [r for r in _rows(run_dir) if "loss" in r]
    # Each pass over the 8 rows counts the 2 bad ones; the skipped steps make the run's 4 steps
    # reach into a second epoch, which counts them again.
    assert steps and steps[-1]["skipped_not_an_image"] in (2, 4)


@pytest.mark.parametrize("damage", ["delete", "garble"])
def test_a_bad_evaluation_image_is_refused_before_step_1(tmp_path, damage):
    """data.val / data.test are read with their images before training starts (they were read
    at the first validation, after an epoch)."""
    synth = tmp_path / "synth"
    synthesize(synth, 12, seed=0, image_size=32, captions_per_image=1, n_val=2, n_test=2)
    image = synth / json.loads((synth / "val.json").read_text())[0]["image"]
    if damage == "delete":
        image.unlink()
    else:
        image.write_bytes(b"\x00not an image")
    run_dir = tmp_path / "ft"
    args = [f"run_dir={run_dir}", "model.preset=test_tiny", f"data.synth_dir={synth}"]
    args += ["data.batch_size=2", "data.num_workers=0", "run.epochs=1", "run.device=cpu"]
    with pytest.raises((ValueError, FileNotFoundError), match=image.name):
        finetune_main(["retrieval", *args])
    assert not (run_dir / "metrics.jsonl").exists()


def _exif_rotated_jpeg(path: Path) -> Image.Image:
    """A 40x20 photo stored sideways with EXIF orientation 6 (display rotated 90 degrees)."""
    upright = Image.new("RGB", (20, 40), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 10))  # red band at the top when upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 40x20, as the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return upright


def test_images_are_read_upright_and_16_bit_pngs_keep_their_range(tmp_path):
    """Every reader (training data, Predictor, the demo's loader) decodes the same way: EXIF
    orientation applied, 16-bit images scaled to 8 bits instead of clipped to white."""
    from dlip.inference.predictor import to_pil
    from dlip.transforms import load_image

    jpeg = tmp_path / "sideways.jpg"
    _exif_rotated_jpeg(jpeg)
    png16 = tmp_path / "deep.png"
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(ramp).save(png16)
    for read in (decode_image, to_pil, load_image):
        up = read(jpeg)
        assert up.size == (20, 40), read  # portrait, as displayed
        top, bottom = np.asarray(up)[2, 10], np.asarray(up)[-3, 10]
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200, read  # red band on top
        deep = np.asarray(read(png16))[:, :, 0]
        assert deep.max() == 255 and deep.min() == 0, read
        assert (deep == 255).mean() < 0.01, read  # was 99.6% white
        assert abs(int(deep[32, 32]) - round(int(ramp[32, 32]) * 255 / 65535)) <= 1, read


# --------------------------------------------------------------- a third broken, every way
def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "orange").save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _broken_images(root: Path) -> list[tuple[str, str]]:
    """(image path relative to root, reason) for every way an image file fails to be read."""
    root.mkdir(parents=True, exist_ok=True)
    bad = {name: str(p.relative_to(root)) for name, p in _bad_paths(root).items()}
    (root / "a_folder.jpg").mkdir()
    (root / "garbage.jpg").write_bytes(b"\x00garbage, not an image")
    (root / "empty.jpg").write_bytes(b"")
    _truncated_jpeg(root / "truncated.jpg")
    return [
        ("gone.jpg", "missing_file"), (bad["missing_file"], "missing_file"),
        ("a_folder.jpg", "missing_file"), (bad["unreadable_file"], "unreadable_file"),
        ("x" * 300 + ".jpg", "unreadable_file"), (bad["too_large"], "too_large"),
        ("garbage.jpg", "not_an_image"), ("empty.jpg", "empty_image"),
        ("truncated.jpg", "truncated"),
    ]  # fmt: skip


BAD_CAPTIONS = [
    (None, "bad_text"),
    (5, "bad_text"),
    ("...", "empty_caption"),
    ("", "empty_caption"),
]


def _mix_broken(good: list[dict], root: Path, prefix: str) -> tuple[list[dict], Counter]:
    """`good` rows interleaved with 13 broken ones (9 images under `root`, named `prefix` +
    their path relative to it, and 4 captions), and the skips by reason they must give."""
    broken, want = [], Counter()
    for image, reason in _broken_images(root):
        broken.append({**good[0], "image": prefix + image})
        want[reason] += 1
    for caption, reason in BAD_CAPTIONS:
        broken.append({**good[1], "caption": caption})
        want[reason] += 1
    rows = list(good)
    for j, row in enumerate(broken):  # spread evenly through the file
        rows.insert(j + j * len(good) // len(broken), row)
    return rows, want


def _with_bad_byte(rows: list[dict], at: int) -> bytes:
    """The rows as JSON lines with a copy of rows[0] at `at` whose caption holds a raw 0xE9
    byte (latin-1 'é', not UTF-8), as a badly converted source file would have it."""
    lines = [json.dumps(row).encode() for row in rows]
    marked = json.dumps({**rows[0], "caption": "caf@ au lait"}).encode().replace(b"@", b"\xe9")
    lines.insert(at, marked)
    return b"\n".join(lines) + b"\n"


def _skips_of(row: dict) -> Counter:
    return Counter({k[len("skipped_") :]: v for k, v in row.items() if k.startswith("skipped_")})


SMALL_RUN = {
    "data.num_workers": 0, "data.hflip": "false", "data.rand_augment": "false",
    "run.log_every": 1, "run.device": "cpu", "model.preset": "test_tiny",
}  # fmt: skip


def test_a_third_of_the_rows_broken_every_way_pretraining_and_finetuning_finish(tmp_path, capsys):
    """One pass over data a third of which is broken in every way a sample can be: both
    trainings finish, and each bad row is counted once, under its reason, in metrics.jsonl and
    in the run's closing line."""
    synth = tmp_path / "synth"
    synthesize(synth, 32, seed=0, image_size=32, captions_per_image=1, n_val=2, n_test=2)
    good = list(read_manifest(synth / "manifest.jsonl"))  # 28 rows, absolute image paths
    rows, want = _mix_broken(good, tmp_path / "bad", f"{tmp_path / 'bad'}/")
    (tmp_path / "broken.jsonl").write_bytes(_with_bad_byte(rows, at=5))
    want["bad_text"] += 1  # 42 rows, 14 broken: 7 batches of 6 are one pass
    run = {"run_dir": tmp_path / "pre", "max_steps": 7, "data.batch_size": 6, **SMALL_RUN}
    run |= {"data.manifests": f"[{tmp_path / 'broken.jsonl'}]", "loss.queue_size": 12}
    assert pretrain_main([f"{k}={v}" for k, v in run.items()]) == 0
    logged = _rows(tmp_path / "pre")
    assert [r["step"] for r in logged] == list(range(1, 8))
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert _skips_of(logged[-1]) == want and logged[-1]["skipped"] == 14
    closing = "samples skipped 14 (bad_text 3, empty_caption 2, empty_image 1, missing_file 3, "
    closing += "not_an_image 1, too_large 1, truncated 1, unreadable_file 2) over the run"
    printed = capsys.readouterr()
    assert closing in printed.out
    # no terminal here, so no progress bar: the console gets a line per metrics record
    assert re.search(r"step 7 \|.*\| skipped 14 \| skipped_missing_file 3 \|", printed.out)

    train = json.loads((synth / "train.json").read_text())[:27]  # Karpathy style, relative
    rows, want = _mix_broken(train, synth / "bad", "bad/")  # 40 rows, 13 broken
    (synth / "broken_train.json").write_text(json.dumps(rows))
    run = {"run_dir": tmp_path / "ft", "run.epochs": 1, "data.batch_size": 4, **SMALL_RUN}
    run |= {"data.train": f"[{synth / 'broken_train.json'}]", "data.image_root": synth}
    run |= {"data.val": synth / "val.json", "data.test": synth / "test.json"}
    run |= {"loss.momentum_distill": "false", "eval.k_test": 2, "eval.batch_size": 4}
    assert finetune_main(["retrieval", *(f"{k}={v}" for k, v in run.items()), "--no-test"]) == 0
    steps = [r for r in _rows(tmp_path / "ft") if "loss" in r]
    assert steps[-1]["step"] == 10 and _skips_of(steps[-1]) == want
    assert "samples skipped 13 (" in capsys.readouterr().out
