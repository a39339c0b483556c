"""Files that are never half-written: atomic writes, folder swaps, checksums."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """nanoseek's cache on this machine: $NANOSEEK_CACHE, else $XDG_CACHE_HOME/nanoseek or ~/.cache/nanoseek."""
    root = os.environ.get("NANOSEEK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "nanoseek"
    return Path(root).joinpath(*parts)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write via a temp file in the same folder + os.replace: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    try:  # Linux shows it; elsewhere the only way to read it is to set it and put it back
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(d: Path) -> None:
    """Flush every file of a folder to disk before it is renamed into place."""
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing it. The old `dst` is renamed aside first and deleted last, so a
    crash leaves either the old or the new folder complete (the old one as `.dst.old-*` if mid-swap)."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
