"""`make demo`'s progress follower (deploy/demo_progress.py) on a stub command and a stub
metadata DB, and bench/demo_timing.py writing timings only where asked."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import demo_timing
from deploy.demo_progress import Progress, progress_line, run_with_progress, sqlite_path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
EPOCH = ("2026-12-05T08:31:02.000000Z [info     ] teacher epoch 3/30: loss=5.7025 hint_loss=0.1000 val=0.2486 (5.3s)"
         " [pipeline.training] loc=training.py:155")


@pytest.fixture
def metadata_db(tmp_path) -> Path:
    """A SQLite file with the two tables the follower reads and an earlier, finished run."""
    db = tmp_path / "airflow.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE dag_run (id INTEGER PRIMARY KEY, dag_id TEXT, run_id TEXT)")
        conn.execute("CREATE TABLE task_instance (task_id TEXT, dag_id TEXT, run_id TEXT, map_index INTEGER,"
                     " try_number INTEGER, state TEXT, duration REAL, end_date TEXT)")
        conn.execute("INSERT INTO dag_run VALUES (1, 'recsys_distillation', 'earlier')")
        conn.execute("INSERT INTO task_instance VALUES ('old_task', 'recsys_distillation', 'earlier', -1, 1, 'success', 9.0, '1')")
    return db


def stub_airflow(db: Path, exit_code: int) -> list[str]:
    """A command that starts a run of two tasks, logs an epoch line, finishes one task, exits."""
    script = textwrap.dedent(f"""
        import sqlite3, sys, time
        with sqlite3.connect({str(db)!r}) as conn:
            conn.execute("INSERT INTO dag_run VALUES (2, 'recsys_distillation', 'manual__now')")
            for task in ("extract_features", "train_teacher"):
                conn.execute("INSERT INTO task_instance VALUES (?, 'recsys_distillation', 'manual__now', -1, 0, NULL, NULL, NULL)", (task,))
        print("some airflow line nobody needs", flush=True)
        with sqlite3.connect({str(db)!r}) as conn:
            conn.execute("UPDATE task_instance SET state = 'success', duration = 41.2, try_number = 1, end_date = '2'"
                         " WHERE task_id = 'extract_features'")
        print({EPOCH!r}, flush=True)
        time.sleep(0.3)
        sys.exit({exit_code})
    """)
    return [sys.executable, "-c", script]


def test_epoch_line_keeps_loss_validation_and_seconds():
    assert progress_line(EPOCH) == "        teacher epoch 3/30: loss=5.7025 val=0.2486 (5.3s)"


def test_other_log_lines_are_not_shown():
    returned = ("2026-12-05T08:30:12Z [info     ] Done. Returned value was: {'best_epoch': 9, 'epochs': 13}"
                " [airflow.task.operators.PythonOperator] loc=python.py:233")
    assert progress_line(returned) is None


def test_follower_prints_the_finished_task_and_the_epoch_and_returns_the_exit_code(tmp_path, metadata_db):
    out, log = io.StringIO(), tmp_path / "demo_run.log"

    code = run_with_progress(stub_airflow(metadata_db, exit_code=3), log, metadata_db, out=out, poll_seconds=0.05)

    printed = out.getvalue()
    assert code == 3
    assert "  [ 1/2] extract_features      success            41.2 s" in printed.splitlines()
    assert "        teacher epoch 3/30: loss=5.7025 val=0.2486 (5.3s)" in printed.splitlines()
    assert "old_task" not in printed and "train_teacher" not in printed  # an earlier run; a task not finished
    assert "some airflow line nobody needs" in printed.split(f"last 50 lines of {log}")[1]  # the tail on failure
    assert "some airflow line nobody needs" in log.read_text()


def test_follower_prints_no_tail_when_the_command_succeeds(tmp_path, metadata_db):
    out = io.StringIO()

    code = run_with_progress(stub_airflow(metadata_db, exit_code=0), tmp_path / "demo_run.log", metadata_db, out=out,
                             poll_seconds=0.05)

    assert code == 0
    assert "some airflow line nobody needs" not in out.getvalue()


class FixedStates:
    def __init__(self, rows):
        self.rows = rows

    def read(self):
        return self.rows


def test_lines_read_in_one_poll_come_in_the_order_they_happened(tmp_path):
    log, out = tmp_path / "demo_run.log", io.StringIO()
    log.write_text("2026-12-05T08:55:23.100000Z [info     ] gate decision: BLESSED [pipeline.steps.run] loc=run.py:219\n")
    rows = [("gate", -1, 1, "success", 0.1, "2026-12-05 08:55:23.200000"),
            ("evaluate", -1, 1, "success", 42.3, "2026-12-05 08:55:23")]

    Progress(log, FixedStates(rows), out).poll()

    assert out.getvalue().splitlines() == ["  [ 1/2] evaluate              success            42.3 s",
                                           "        gate decision: BLESSED",
                                           "  [ 2/2] gate                  success             0.1 s"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the child's death signal is Linux's prctl")
def test_the_command_stops_when_the_follower_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    sleeper = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)"
    follower = subprocess.Popen([sys.executable, "-m", "deploy.demo_progress", "--log", str(tmp_path / "log"), "--db",
                                 str(tmp_path / "none.db"), "--", sys.executable, "-c", sleeper],
                                cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and follower.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())

    follower.send_signal(signal.SIGKILL)
    follower.wait()

    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_metadata_db_is_airflow_home_sqlite_unless_configured_otherwise(tmp_path):
    assert sqlite_path({"AIRFLOW_HOME": str(tmp_path)}) == tmp_path / "airflow.db"
    assert sqlite_path({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////x/a.db"}) == Path("/x/a.db")
    assert sqlite_path({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://db/airflow"}) is None


@pytest.fixture
def finished_run(monkeypatch):
    tasks = [{"task": "resolve_config", "state": "success", "seconds": 3.5, "start": "2026-12-05T08:30:08"},
             {"task": "promote", "state": "skipped", "seconds": 0.0, "start": None}]
    monkeypatch.setattr(demo_timing, "latest_run", lambda dag_id="recsys_distillation": ("manual__now", "success", tasks))


def test_demo_timing_prints_the_table_and_writes_nothing_by_default(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in RESULTS.rglob("*") if p.is_file()}

    code = demo_timing.main(["--ds", "1998-04-22", "--wall", "12.34"])

    assert code == 0
    assert "resolve_config        success         3.5" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in RESULTS.rglob("*") if p.is_file()} == before
    assert list(tmp_path.iterdir()) == []


def test_demo_timing_writes_json_where_asked(finished_run, tmp_path):
    out = tmp_path / "timing" / "demo_timing.json"

    demo_timing.main(["--ds", "1998-04-22", "--wall", "12.34", "--out", str(out)])

    payload = json.loads(out.read_text())
    assert payload["run_id"] == "manual__now" and payload["airflow_dags_test_wall_seconds"] == 12.3
    assert payload["sum_of_task_seconds"] == 3.5  # 3.5 + 0.0
    assert [t["task"] for t in payload["tasks"]] == ["resolve_config", "promote"]
