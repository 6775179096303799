"""Atomic outputs: write aside, flush, then rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk (before a rename publishes it)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
