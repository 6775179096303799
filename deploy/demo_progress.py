"""``make demo``'s progress: runs a command (``airflow dags test ...``) with all its output in a
log file and prints, as they come, one line per finished task (state, duration) and the
training and gate lines of the task logs.

Task states come from the metadata DB (SQLite, read-only, as under ``make demo``); the
training lines from the log. Prints the log's last lines when the command fails.

    python -m deploy.demo_progress --log FILE [--db airflow.db] -- airflow dags test DAG -c CONF

Exits with the command's exit code. Standard library only, so it runs before anything else
of the project imports.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import TextIO

DAG_ID = "recsys_distillation"
FINISHED = ("success", "failed", "skipped", "upstream_failed", "removed")
SHOWN_STATES = FINISHED + ("up_for_retry",)
TAIL_LINES = 50
# Airflow's console format: "<time> [<level>] <message> [<logger>] key=value ...".
LOG_RECORD = re.compile(r"^\S+\s+\[\s*\w+\s*\]\s+(?P<message>.*?)\s+\[[\w.]+\](?:\s+\w+=.*)?$")
# What a person waiting for the run wants to see: each epoch, early stopping, the trained
# model, the gate's decision and any failure that task callbacks announce.
PROGRESS = re.compile(r"\bepoch \d+/\d+|no validation gain for|best epoch \d+|^gate decision:|\(try \d+ of \d+\)")
KEPT_TERMS = re.compile(r"\b(?:loss|val)=\S+")


def progress_line(line: str) -> str | None:
    """The terminal's line for one line of the log, or None if it is not one to show.

    An epoch line keeps only its total loss, validation score and time:
    ``teacher epoch 3/30: loss=1.2 hint_loss=0.1 val=0.2 (9.1s)`` -> ``teacher epoch 3/30: loss=1.2 val=0.2 (9.1s)``.
    """
    record = LOG_RECORD.match(line.rstrip("\n"))
    message = record["message"] if record else line.strip()
    if not PROGRESS.search(message):
        return None
    head, sep, rest = message.partition(": ")
    if sep and re.search(r"\bepoch \d+/\d+", head):
        seconds = re.search(r"\(\d[\d.]*s\)\s*$", rest)
        message = f"{head}: {' '.join(KEPT_TERMS.findall(rest))}{' ' + seconds[0] if seconds else ''}"
    return f"        {message}"


def utc_time(text: str) -> str:
    """A sortable ``YYYY-MM-DD HH:MM:SS.ffffff`` from the start of a log line or a DB time
    (both UTC), or "" if it has none."""
    found = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(\.\d+)?", text)
    return f"{found[1]} {found[2]}{(found[3] or '.').ljust(7, '0')[:7]}" if found else ""


def sqlite_path(environ: dict[str, str] = os.environ) -> Path | None:
    """The metadata DB's file when Airflow uses SQLite (its default under ``$AIRFLOW_HOME``)."""
    url = environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if url:
        return Path(url.removeprefix("sqlite:///").split("?")[0]) if url.startswith("sqlite:///") else None
    return Path(environ.get("AIRFLOW_HOME", Path.home() / "airflow")) / "airflow.db"


class TaskStates:
    """Reads the task instances of the newest run of a DAG that started after it was made."""

    def __init__(self, db: Path | None, dag_id: str = DAG_ID):
        self.db, self.dag_id = db, dag_id
        self.after = self._query("SELECT coalesce(max(id), 0) FROM dag_run WHERE dag_id = ?", (dag_id,))
        self.after = self.after[0][0] if self.after else 0

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        if self.db is None or not self.db.exists():
            return []
        try:
            with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=2)) as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.Error:  # not migrated yet, or busy: the next poll reads it
            return []

    def read(self) -> list[tuple]:
        """``(task_id, map_index, try_number, state, duration, end_date)`` of each task instance."""
        return self._query(
            "SELECT ti.task_id, ti.map_index, ti.try_number, ti.state, ti.duration, ti.end_date FROM task_instance ti"
            " JOIN dag_run r ON r.dag_id = ti.dag_id AND r.run_id = ti.run_id"
            " WHERE r.id = (SELECT max(id) FROM dag_run WHERE dag_id = ? AND id > ?)", (self.dag_id, self.after))


class Progress:
    """Prints what is new in the task states and the log since the last call of :meth:`poll`."""

    def __init__(self, log: Path, states: TaskStates, out: TextIO, quiet_seconds: float = 60.0):
        self.log, self.states, self.out, self.quiet_seconds = log, states, out, quiet_seconds
        self.offset, self.partial, self.shown, self.finished = 0, "", set(), set()
        self.last_print = time.monotonic()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
        self.last_print = time.monotonic()

    def poll(self, final: bool = False) -> None:
        """Print the new lines, log and task lines in the order they happened."""
        events = self._log_events(final)
        rows = self.states.read()
        done = [r for r in rows if r[3] in SHOWN_STATES and r[:4] not in self.shown]
        for task_id, map_index, tries, state, duration, end_date in sorted(done, key=lambda r: r[5] or "~"):
            self.shown.add((task_id, map_index, tries, state))
            if state in FINISHED:
                self.finished.add((task_id, map_index))
            name = task_id if map_index < 0 else f"{task_id}[{map_index}]"
            took = f"{duration:7.1f} s" if duration is not None else "      - "
            events.append((utc_time(end_date) if end_date else "~", f"  [{len(self.finished):2d}/{len(rows)}] {name:22s}{state:16s}{took}"))
        for _, text in sorted(events, key=lambda event: event[0]):
            self.say(text)
        running = [r[0] for r in rows if r[3] == "running"]
        if running and time.monotonic() - self.last_print >= self.quiet_seconds:
            self.say(f"        ... still running: {', '.join(running)}")

    def _log_events(self, final: bool) -> list[tuple[str, str]]:
        if not self.log.exists():
            return []
        with self.log.open("r", encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        lines = (self.partial + chunk).split("\n")
        self.partial = "" if final else lines.pop()  # a line still being written waits for its end
        return [(utc_time(line), shown) for line in lines if line and (shown := progress_line(line))]


def tail(path: Path, n: int = TAIL_LINES) -> str:
    """The last ``n`` lines of a text file ("" if there is none)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


class Stopped(Exception):
    """The follower was asked to stop (SIGTERM, SIGHUP)."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the follower dies, even by SIGKILL,
    so no run goes on writing to the demo's Airflow home unseen."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def run_with_progress(command: list[str], log: Path, db: Path | None, out: TextIO = sys.stdout,
                      poll_seconds: float = 1.0, dag_id: str = DAG_ID) -> int:
    """Run ``command`` with its output in ``log`` and print its progress until it exits.

    Args:
        command: The command and its arguments.
        log: File that receives the command's stdout and stderr (overwritten).
        db: The Airflow metadata DB (SQLite file) to read task states from; None: log lines only.
        out: Where the progress goes.
        poll_seconds: Seconds between two reads of the DB and the log.
        dag_id: The DAG whose newest run is followed.

    Returns:
        The command's exit code.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    states = TaskStates(db, dag_id)
    progress = Progress(log, states, out)
    if db is None:
        progress.say("  (metadata DB is not SQLite: no task lines, training lines only)")
    started = time.monotonic()
    with log.open("wb") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        handlers = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while child.poll() is None:
                time.sleep(poll_seconds)
                progress.poll()
        except KeyboardInterrupt:  # Ctrl-C reached the child too: let it stop, then report
            child.wait()
        except Stopped as stop:
            progress.say(f"  stopping {Path(command[0]).name} ({stop})")
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a task may hold SIGTERM while it runs
                child.kill()
                child.wait()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    progress.poll(final=True)
    minutes, seconds = divmod(time.monotonic() - started, 60)
    progress.say(f"  {Path(command[0]).name} exited with {child.returncode} after {int(minutes)} min {seconds:.0f} s")
    if child.returncode != 0:
        progress.say(f"--- last {TAIL_LINES} lines of {log} ---\n{tail(log)}")
    return child.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a command (airflow dags test ...) and print its progress.")
    parser.add_argument("--log", type=Path, required=True, help="file for the command's whole output")
    parser.add_argument("--db", type=Path, help="Airflow's SQLite metadata DB (default: from the Airflow settings in the environment)")
    parser.add_argument("--dag-id", default=DAG_ID)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    print(f"Running {' '.join(command[:3])}; its whole output goes to {args.log}", flush=True)
    return run_with_progress(command, args.log, args.db or sqlite_path(), dag_id=args.dag_id)


if __name__ == "__main__":
    raise SystemExit(main())
