"""Files that are never half-written: atomic writes, folder swaps, checksums."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
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
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # O_EXCL like mkstemp, but mode 0666 less the umask (what a plain open() gives): mkstemp's 0600 would hide
    # an exported model from other accounts
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_entries(path.parent)


def usual_mode(path: str | Path, executable: bool = False) -> None:
    """Give a file the mode a plain open() (or a compiler) would: 0666 (0777) less the umask. For files written
    by tools that create them 0600 (safetensors' save_file, a temporary file renamed into place), which would
    hide an exported model or a built library from the other accounts of a machine."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(d: Path) -> None:
    """Flush every file of a folder and its subfolders, and their folder entries, to disk before the folder is
    renamed into place."""
    for f in d.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            fsync_entries(f)
    fsync_entries(d)


def fsync_entries(d: Path) -> None:
    """Flush a folder's own entries (names that a rename or a new file changed) to disk, where the system allows:
    without it a power cut can forget a rename whose files were flushed."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. Windows, which cannot open a folder this way
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def replace_dir(src: Path, dst: Path, aside: Path | None = None) -> None:
    """Move folder `src` to `dst`, replacing it. The old `dst` is renamed aside first (to `aside`, a name its
    reader knows, or `.dst.old-*`) and deleted last, with any copy an earlier crash left there: a crash leaves
    the old or the new folder complete."""
    old = aside or dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_entries(dst.parent)  # the new folder's name is on disk before the old one goes
    shutil.rmtree(old, ignore_errors=True)
