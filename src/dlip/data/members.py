"""Images inside tar shards named like files: `shards/00012.tar/000120034.jpg` is the member
`000120034.jpg` of the tar `shards/00012.tar` (webdataset / img2dataset shards). Every image
read of dlip that takes a path (`common.decode_image`, the index, the web app's thumbnails)
goes through `read_bytes`, so an index built over shards is searched, re-ranked and shown
like one built over a folder.

`list_members(root)` lists a folder of tar shards as such names, one per sample (webdataset's
rule: a sample is the files sharing a key, the name up to the first dot of the basename), the
sample's image chosen among IMAGE_SUFFIXES.
"""

from __future__ import annotations

import os
import tarfile
import threading
from pathlib import Path

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_open: dict[tuple[str, int], tuple[tarfile.TarFile, threading.Lock]] = {}
_open_lock = threading.Lock()


def split_member(path: str | Path) -> tuple[Path, str] | None:
    """(tar file, member name) when a parent of `path` is a tar file; None otherwise."""
    path = Path(path)
    for parent in path.parents:
        if parent.suffix == ".tar" and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


def _tar(path: Path) -> tuple[tarfile.TarFile, threading.Lock]:
    """An open tar per (file, process): a forked DataLoader worker must not share the parent's
    file offset; the lock serialises the seek + read of threads (the web app's)."""
    key = (str(path), os.getpid())
    with _open_lock:
        if key not in _open:
            _open[key] = (tarfile.open(path, "r:"), threading.Lock())  # noqa: SIM115 (kept open)
        return _open[key]


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a file, or of a tar member named as above (FileNotFoundError when the
    member is not in its tar; OSError as reading a file would raise)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except NotADirectoryError:  # a parent is a file: perhaps a tar
        found = split_member(path)
        if found is None:
            raise
    tar_path, member = found
    tar, lock = _tar(tar_path)
    with lock:
        try:
            f = tar.extractfile(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {tar_path}") from None
        if f is None:
            raise IsADirectoryError(f"{member} in {tar_path} is not a file")
        return f.read()


def stat(path: str | Path) -> os.stat_result:
    """The file's stat, or its tar's for a member (a changed shard changes its members)."""
    path = Path(path)
    try:
        return path.stat()
    except NotADirectoryError:
        found = split_member(path)
        if found is None:
            raise
        return found[0].stat()


def list_members(root: str | Path) -> list[str]:
    """`SHARD.tar/MEMBER` names (relative to `root`, sorted by shard, in tar order) of each
    sample's image in the tar shards directly under `root`."""
    root = Path(root)
    names = []
    for shard in sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.is_file()):
        seen: set[str] = set()
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                key, _, suffix = base.partition(".")
                key = info.name[: len(info.name) - len(base)] + key
                if info.isfile() and suffix.lower() in IMAGE_SUFFIXES and key not in seen:
                    seen.add(key)
                    names.append(f"{shard.name}/{info.name}")
    return names
