"""Training straight from webdataset sources: img2dataset's output folder as it is, brace
patterns of tars, http:// URLs served from loopback and pipe: commands.

The real img2dataset downloads a small site from a loopback HTTP server into 4 webdataset
shards (12 photos, a corrupt file it does not decode, a whitespace caption and a 404; its
*_stats.json count 14 successes). The same server then serves those shards, and a 2-process
torchrun run trains from `http://127.0.0.1:PORT/web/{00000..00003}.tar`.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import dlip
from dlip.cli.train import pretrain_main
from dlip.config import ConfigError
from dlip.data.common import SkipCounts
from dlip.data.webdata import decode_sample, wds_pipeline
from dlip.models.presets import get_config
from dlip.train.config import load
from dlip.train.pretrain import build_loader
from dlip.train.wds_loader import WdsLoader, web_source
from dlip.transforms import eval_transform

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI check from albumentations
pytest.importorskip("img2dataset")
pytestmark = pytest.mark.usefixtures("one_thread")

PHOTOS = Path(dlip.__file__).parent / "assets" / "photos"
CONFIG = get_config("test_tiny")  # 32 px
SHARDS = 4  # 15 url rows, 4 per shard
SUCCESSES = 14  # all but the 404: img2dataset never decodes, so the corrupt file counts
LOCAL = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # curl skips proxies


class _Site(http.server.SimpleHTTPRequestHandler):
    """Serves the module's root; remembers the paths asked for."""

    requested: list[str]

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(root dir, base URL, requested paths) of a loopback server running for the module."""
    root = tmp_path_factory.mktemp("www")
    handler = type("Handler", (_Site,), {"requested": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in LOCAL.items():
            if "proxy" in name.lower():
                mp.setenv(name, value)
        yield root, f"http://127.0.0.1:{server.server_address[1]}", handler.requested
    server.shutdown()
    thread.join()


def _write_site(site: Path) -> list[tuple[str, str]]:
    """(file name, caption) rows: 12 small crops of the bundled photos, then 3 bad ones."""
    site.mkdir()
    rows = []
    for photo in sorted(PHOTOS.glob("*.jpg")):
        with Image.open(photo) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        for k in range(4):
            name = f"{photo.stem}_{k}.jpg"
            rgb.crop((k * w // 8, 0, w - (3 - k) * w // 8, h)).resize((48, 48)).save(site / name)
            rows.append((name, f"a {photo.stem} photo number {k}"))
    (site / "noise.jpg").write_bytes(os.urandom(2000))
    return [*rows, ("noise.jpg", "random bytes"), ("missing.jpg", "a 404"), (rows[0][0], "  ")]


@pytest.fixture(scope="module")
def web(server) -> Path:
    """img2dataset's webdataset output folder (under the server's root, as `web/`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset import download

    root, base, _ = server
    rows = _write_site(root / "site")
    urls = root.parent / "urls.parquet"
    table = {"url": [f"{base}/site/{n}" for n, _ in rows], "caption": [c for _, c in rows]}
    pq.write_table(pa.table(table), urls)
    sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own handler
    try:
        download(
            url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
            output_format="webdataset", output_folder=str(root / "web"), processes_count=1,
            thread_count=4, number_sample_per_shard=4, disable_all_reencoding=True, timeout=5,
            retries=0, enable_wandb=False,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, sigint)
    return root / "web"


def items(run_dir: Path, manifests: list[str], **extra: object) -> list[str]:
    base = {
        "run_dir": str(run_dir),
        "max_steps": 2,
        "model.preset": "test_tiny",
        "data.manifests": json.dumps(manifests),  # JSON is YAML: braces inside quotes
        "data.batch_size": 2,
        "data.num_workers": 0,
        "data.max_length": 20,
        "loss.momentum_distill": "false",
        "optim.warmup_steps": 1,
        "run.log_every": 1,
        "run.ckpt_every": 100,
        "run.device": "cpu",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def check_trained(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (run_dir / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------ sources
def test_img2dataset_folder_is_counted_by_its_stats_and_decoded(web):
    stats = [json.loads(p.read_text()) for p in sorted(web.glob("*_stats.json"))]
    assert len(stats) == SHARDS and sum(s["successes"] for s in stats) == SUCCESSES
    source = web_source(web)
    assert (source.kind, source.counted, source.samples) == ("tar_dir", SUCCESSES, SUCCESSES)
    assert [Path(u).name for u in source.urls] == [f"{i:05d}.tar" for i in range(SHARDS)]
    # Every sample once, in order: the corrupt image and the blank caption are counted skips.
    pipe = wds_pipeline(
        web, eval_transform(CONFIG), 5, shardshuffle=False, shuffle_buffer=0, partial=True
    )
    batches = list(pipe)
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == 12 and all(c.startswith("a ") for c in captions)
    skipped = sum((b["skipped"] for b in batches), start=SkipCounts())
    assert skipped == {"not_an_image": 1, "empty_caption": 1}
    assert batches[0]["image"].shape == (5, 3, 32, 32)


def test_caption_from_the_json_when_there_is_no_txt(web):
    jpg = (web.parent / "site" / "chelsea_0.jpg").read_bytes()
    meta = json.dumps({"caption": "A cat, looking up!", "key": "7"}).encode()
    out = decode_sample({"__key__": "7", "jpg": jpg, "json": meta}, eval_transform(CONFIG), 30)
    assert out["caption"] == "a cat, looking up" and out["image_id"] == "7"


def test_brace_pattern_and_pipe_sources_mixed_by_weight(web, tmp_path):
    pattern = str(web / "{00000..00002}.tar")  # stats: 4 + 4 + 4 successes
    piped = f"pipe:cat {web}/{{00000..00003}}.tar"
    assert (web_source(pattern).kind, web_source(pattern).samples) == ("tars", 12)
    assert (web_source(piped).kind, len(web_source(piped).urls)) == ("pipe", SHARDS)
    cfg = load(
        None,
        items(tmp_path, [pattern, piped], **{"data.weights": "[1, 3]",
              "data.num_samples": "[null, 20]", "data.batch_size": 4}),
    )  # fmt: skip
    loader = build_loader(cfg, CONFIG)
    assert isinstance(loader, WdsLoader)
    assert [s.samples for s in loader.sources] == [12, 20]
    assert len(loader) == (12 + 20) // 4 and loader.weights == [1.0, 3.0]
    batches = list(loader)
    assert len(batches) == len(loader)
    assert all(b["image"].shape == (4, 3, 32, 32) for b in batches)


# ---------------------------------------------------------------------------------- training
def test_pretrain_from_an_img2dataset_folder_as_it_is(web, tmp_path):
    run_dir = tmp_path / "run"
    assert pretrain_main(items(run_dir, [str(web)])) == 0  # counted from *_stats.json
    check_trained(run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_from_http_urls(server, web, tmp_path):
    _, base, requested = server
    url = f"{base}/web/{{00000..{SHARDS - 1:05d}}}.tar"
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "dlip", "pretrain",
        *items(run_dir, [url], **{"data.num_samples": f"[{SUCCESSES}]"}),
    ]  # fmt: skip
    env = {**LOCAL, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    check_trained(run_dir)
    fetched = {p for p in requested if p.startswith("/web/")}
    assert fetched and fetched <= {f"/web/{i:05d}.tar" for i in range(SHARDS)}


# ------------------------------------------------------------------------------------- errors
def test_source_errors_name_the_source_and_the_key(web, tmp_path):
    url = "http://127.0.0.1:9/{00000..00003}.tar"
    cfg = load(None, items(tmp_path, [str(web), url]))
    with pytest.raises(
        ValueError, match=r"data\.manifests\[1\] http.*data\.num_samples=\[null, N\]"
    ):
        build_loader(cfg, CONFIG)

    cfg = load(None, items(tmp_path, ["s3://b/{0000..0009}.tar"], **{"data.num_samples": "[9]"}))
    with pytest.raises(ValueError, match=r"cannot open s3:// URLs.*pipe:aws s3 cp"):
        build_loader(cfg, CONFIG)

    bare = tmp_path / "bare"  # tars without their stats: not counted
    bare.mkdir()
    shutil.copy(web / "00000.tar", bare / "00000.tar")
    cfg = load(None, items(tmp_path, [str(bare / "{00000..00000}.tar")]))
    with pytest.raises(FileNotFoundError, match=r"data\.manifests\[0\] .*bare.*_stats\.json"):
        build_loader(cfg, CONFIG)
    cfg = load(None, items(tmp_path, [str(bare / "{00000..00001}.tar")]))
    with pytest.raises(FileNotFoundError, match="1 of its 2 tars not found"):
        build_loader(cfg, CONFIG)

    with pytest.raises(ConfigError, match=r"data\.num_samples has 2 entries for 1 data\.manifests"):
        load(None, items(tmp_path, [url], **{"data.num_samples": "[5, 5]"}))
    with pytest.raises(ConfigError, match=r"data\.num_samples=\(0,\) must be all >= 1 or null"):
        load(None, items(tmp_path, [url], **{"data.num_samples": "[0]"}))

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("")
    cfg = load(None, items(tmp_path, [url, str(jsonl)]))
    with pytest.raises(ValueError, match=r"mixes webdataset sources \['http.*jsonl manifests"):
        build_loader(cfg, CONFIG)
    cfg = load(None, items(tmp_path, [str(jsonl)], **{"data.num_samples": "[5]"}))
    with pytest.raises(ValueError, match=r"data\.num_samples is for webdataset sources"):
        build_loader(cfg, CONFIG)


def test_a_pipeline_over_http_counts_a_missing_shard(server, web):
    _, base, _ = server
    urls = [f"{base}/web/00000.tar", f"{base}/web/absent.tar"]
    batches = list(
        wds_pipeline(urls, eval_transform(CONFIG), 2, shardshuffle=False, shuffle_buffer=0)
    )
    assert sum(len(b["caption"]) for b in batches) == 4
    assert batches[-1]["skipped"] == {"bad_shard": 1}
    assert isinstance(batches[0]["image"], torch.Tensor)
