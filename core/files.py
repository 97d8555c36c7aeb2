"""Whole-file writes that never leave a half-written file behind (write a hidden temporary next to the
destination, then rename it over: atomic on one filesystem), and a lock for one writer per folder."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import DSparkError


def write_text_atomic(path: str | Path, text: str) -> None:
    """A temporary of its own (several processes may write the same file at once), then one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def folder_lock(out: Path, name: str, who: str):
    """Hold `<out>/.<name>.lock` (non-blocking flock; the kernel drops it when the process ends, even
    killed), making `out` if needed; `who` names the command in the error another job gets. On the way
    out the lock file goes, and so do the folders this run made if they are left empty (a refused run)."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f".{name}.lock"
    while True:
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DSparkError(f"another {who} is writing to {out} (pid {pid}): "
                              "wait for it or pass another output_dir=") from None
        except OSError as e:   # a filesystem without flock (some NFS mounts): leave nothing behind
            os.close(fd)
            if not existed:
                path.unlink(missing_ok=True)
            _remove_empty(made)
            raise DSparkError(f"cannot lock {path} ({e.strerror}): pass an output_dir= on a local disk") from None
        if path.exists() and path.stat().st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)   # its last holder removed the file as we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)   # while still held, so no one locks a file that is gone
        os.close(fd)
        _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders a call made (deepest first) while they are empty."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            break   # not empty: this run wrote there
