"""Crash-safe outputs (write aside, flush, then swap into place), append-only journals, the
file lock that serialises writers sharing a directory, and the sweep of what killed writers
left behind.

Every temporary entry a writer makes is named ``.tmp-<name>-<id>`` (a directory) or
``.<name>.<id>.tmp`` (a file) beside its destination, and its writer holds an exclusive
``flock`` on it for as long as it lives. The kernel drops that lock when the writer dies,
however it dies (kill -9, out of memory), so :func:`sweep_debris` can tell a live writer's
entry from a dead one's without clocks or process ids, on one host or on a shared file system.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

# Names of temporary entries (and of the ``.old-*`` directories an earlier publish_dir made).
DEBRIS = re.compile(r"^\.(tmp-.+|old-.+|.+\.tmp)$")
# Crash tests set this to a crash point's name: the process kills itself there with SIGKILL.
KILL_AT_ENV = "RECSYS_KILL_AT"
_RENAME_EXCHANGE = 2  # linux/fs.h


def crash_point(name: str) -> None:
    """Die by SIGKILL here when ``$RECSYS_KILL_AT`` is ``name`` (the crash tests' hook; a no-op otherwise)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _exchange(a: Path, b: Path) -> None:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Put ``tmp_dir`` at ``final_dir`` atomically: readers see the old or the new, and once
    ``final_dir`` exists it never goes missing.

    A first publish is a rename; a re-publish swaps the two directories in one step, after
    which ``tmp_dir`` holds the old content for the caller to delete. Where the file system
    cannot swap (``EINVAL``: e.g. some network file systems), it falls back to two renames,
    between which ``final_dir`` is briefly missing, and says so in the log.
    """
    try:
        os.rename(tmp_dir, final_dir)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        try:
            _exchange(tmp_dir, final_dir)
        except OSError as swap_error:
            if swap_error.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            log.warning("%s: this file system cannot swap directories; publishing with two renames", final_dir)
            old = final_dir.with_name(f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final_dir, old)
            os.rename(tmp_dir, final_dir)
            os.rename(old, tmp_dir)
    fsync_dir(final_dir.parent)


@contextlib.contextmanager
def _claimed(make: Callable[[Path], None], fresh_path: Callable[[], Path]) -> Iterator[Path]:
    """Create a temporary entry at ``fresh_path()`` with ``make`` and hold an exclusive flock
    on it for the block.

    A sweep may take the entry between its creation and our lock (it is unlocked then); the
    identity check after locking catches that, and the entry is made again under a new name.
    """
    while True:
        path = fresh_path()
        make(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # swept before we could open it
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield path
    finally:
        os.close(fd)


@contextlib.contextmanager
def temp_dir(final_dir: str | Path) -> Iterator[Path]:
    """A fresh, locked ``.tmp-<name>-<id>`` directory beside ``final_dir``, deleted after the block.

    Sweeps the debris of dead writers beside ``final_dir`` first. If the block published the
    directory (renamed it to ``final_dir``), nothing is left to delete; if it swapped it with
    an older ``final_dir``, the old content is what gets deleted.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_debris(final_dir.parent)
    with _claimed(os.mkdir, lambda: final_dir.with_name(f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}")) as path:
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final_dir``; publish it only if the block succeeds.

    A crash or exception inside the block leaves ``final_dir`` as it was; an exception
    leaves no temporary directory behind, and a kill leaves one that the next writer in the
    same directory sweeps. What is published is flushed to disk first.
    """
    final_dir = Path(final_dir)
    with temp_dir(final_dir) as tmp_dir:
        yield tmp_dir
        fsync_tree(tmp_dir)
        crash_point("publish.before")
        publish_dir(tmp_dir, final_dir)
        crash_point("publish.after")


def sweep_debris(parent: str | Path) -> list[Path]:
    """Delete the temporary entries in ``parent`` whose writers are dead; return what went.

    An entry is debris when its name is a temporary one (:data:`DEBRIS`) and nobody holds
    its lock: a live writer always does. Safe to call at any time, from any process.
    """
    parent = Path(parent)
    removed = []
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        if not DEBRIS.match(entry.name):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live writer's
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        finally:
            os.close(fd)
    if removed:
        log.info("swept %d temporary entr%s left by killed writers in %s: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", parent, [p.name for p in removed])
    return removed


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (temporary file, fsync, rename)."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a locked temporary file beside ``path``; if the block succeeds, flush it and
    rename it to ``path``. Readers see the old file or the new one, never a part.

    The temporary file has ``mode`` from its creation on, whatever the umask (``0o600`` for
    a secret: no other user can ever read a byte of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_debris(path.parent)

    def create(p: Path) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    with _claimed(create, lambda: path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")) as tmp:
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """Write a text file atomically (:func:`atomic_file`), with ``mode``."""
    with atomic_file(path, mode) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


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
    """Flush every file and directory under ``root`` to disk (before a rename publishes it)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)
