"""Atomic outputs (write aside, flush, then rename into place), append-only journals, and
the file lock that serialises writers sharing a directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap ``tmp_dir`` into ``final_dir`` with renames only: readers see old or new, never half."""
    old = final_dir.with_name(f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}")
    if final_dir.exists():
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final_dir``; publish it only if the block succeeds.

    A crash or exception inside the block leaves ``final_dir`` as it was and no temporary
    directory behind.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.with_name(f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        fsync_tree(tmp_dir)
        publish_dir(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (temporary file, fsync, rename)."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically: readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line and flush it to disk; earlier lines are never rewritten.

    Writers sharing the file must hold a common :func:`file_lock`. If a crash tore the last
    line, the new record starts on a line of its own, so the tear costs only that line.
    """
    line = json.dumps(record, sort_keys=True, default=str).encode() + b"\n"
    with open(path, "a+b") as handle:  # "a": every write goes to the end, whatever the position
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = b"\n" + line
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines journal in the order written (none if there is no file).

    A line that does not parse (torn by a crash mid-append) is skipped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not a JSON record (torn by a crash?); skipped", path, number)
    return records


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    Processes taking the same lock file run their blocks one at a time, on a local disk and on
    NFS (Linux turns flock into a POSIX lock there). The kernel drops the lock when its holder
    dies, so a crash never leaves it held. Not re-entrant: a process that takes it twice waits
    for itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk (before a rename publishes it)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
