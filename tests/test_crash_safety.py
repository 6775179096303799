"""Crash safety of the real CLIs: each is killed with SIGKILL as a subprocess (from outside
while it writes, or at a named crash point inside), and then nothing partial may be
visible, the next run must sweep the debris, and the re-run must reproduce the output the
killed run would have published.

Crash points (``pipeline.io.crash_point``, armed by ``$RECSYS_KILL_AT``):
``publish.before`` (output complete in its temporary directory, not yet published),
``publish.after`` (swapped into place, the old version not yet deleted),
``promote.published`` (registry version renamed into place, champion not yet moved),
``promote.champion_written`` (champion journaled and moved, not yet pinned for serving);
tests/test_champion_safety.py covers every registry step with what may follow it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog, date_partition
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_logs
from pipeline.io import DEBRIS, KILL_AT_ENV, publish_dir, sweep_debris, temp_dir
from pipeline.registry import Registry
from tests.helpers import saved_model

REPO = Path(__file__).resolve().parents[1]
DS = "2024-01-31"
TINY = {
    "features": {"window_days": 14, "shuffle_partitions": 2},
    "training": {"batch_size": 256, "patience": 1},
    "teacher": {"embedding_dim": 16, "hidden_units": [16], "output_dim": 16, "epochs": 2},
    "soft_targets": {"top_k": 20}, "serving": {"top_k": 20},
}
SETS = [f"--set={section}.{key}={json.dumps(value)}" for section, values in TINY.items() for key, value in values.items()]
KILLED = -signal.SIGKILL


def debris(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if DEBRIS.match(p.name)) if parent.is_dir() else []


def start(args: list[str], kill_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    # A session of its own, so a kill reaches Spark's JVM too.
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        with_group(proc, signal.SIGKILL)
    return proc.returncode, out


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run(args: list[str], kill_at: str | None = None) -> tuple[int, str]:
    return finish(start(args, kill_at))


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL ``proc`` (and its group) as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended before the kill point:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.02)
    proc.kill()
    with_group(proc, signal.SIGKILL)
    proc.communicate()


def tables(path: Path) -> dict[str, list]:
    """Every Parquet table under ``path``, rows sorted, so equal outputs compare equal: a
    top-level directory of Spark's ``part-*`` files is one table, any other Parquet file its own
    (the soft targets' ``users.parquet`` and ``selection/users.parquet`` are two)."""
    files = [p.relative_to(path) for p in path.rglob("*.parquet")]
    names = sorted({f.parts[0] if f.name.startswith("part-") else str(f) for f in files})
    return {name: sorted(map(repr, pq.read_table(path / name).to_pylist())) for name in names}


def feature_job(catalog: Catalog) -> tuple[list[str], Path]:
    """The feature job's command line for ``DS``, and the features home it writes: where the
    steps look for the features under ``TINY``."""
    home = catalog.for_run(DS, load_config(TINY)).features_home
    args = ["spark_jobs/extract_features.py", "--raw", str(catalog.raw), "--out", str(home),
            "--ds", DS, "--master", "local[1]", "--no-validation", "--config-json", json.dumps({"features": TINY["features"]})]
    return args, home


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    """A data root of its own holding the synthetic raw logs, and nothing else."""
    catalog = Catalog(tmp_path / "data")
    generate_synthetic_logs(catalog.raw, users=120, items=80, days=14, events=8_000, seed=5, end_date=DS)
    return catalog


@pytest.fixture
def features(catalog) -> Path:
    """The catalog's features of ``DS``, published by an ordinary run of the feature job."""
    args, home = feature_job(catalog)
    code, out = run(args)
    assert code == 0, out[-3000:]
    return date_partition(home, DS)


# ---------------------------------------------------------------------- the pieces
def test_republish_never_leaves_the_final_path_missing(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("1")
    new = tmp_path / ".tmp-out-1"
    new.mkdir()
    (new / "v").write_text("2")
    real_rename = os.rename

    def watched_rename(a, b):
        real_rename(a, b)
        assert final.is_dir(), f"{final} was missing after rename({a}, {b})"

    monkeypatch.setattr(os, "rename", watched_rename)
    publish_dir(new, final)
    assert (final / "v").read_text() == "2"
    assert (new / "v").read_text() == "1"  # the old version, for the caller to delete


def test_sweep_spares_live_writers_and_takes_dead_ones(tmp_path):
    final = tmp_path / "out"
    code = (f"import time; from pipeline.io import temp_dir\n"
            f"with temp_dir({str(final)!r}) as t:\n"
            f"    (t / 'part').write_text('x'); print(t, flush=True); time.sleep(600)")
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        live = Path(writer.stdout.readline().strip())
        assert live.is_dir() and DEBRIS.match(live.name)
        assert sweep_debris(tmp_path) == [] and live.is_dir()
        with temp_dir(final) as mine:  # another writer beside it sweeps, and spares it too
            assert live.is_dir() and mine.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert debris(tmp_path) == [live]
    assert sweep_debris(tmp_path) == [live]
    assert not live.exists()


# ---------------------------------------------------------------------- the real CLIs
def test_feature_job_killed_at_any_point(catalog):
    args, home = feature_job(catalog)
    final = date_partition(home, DS)

    # Killed from outside while Spark writes the first table: nothing is published.
    proc = start(args)
    kill_when(proc, lambda: any(home.glob(".tmp-*/**/*.parquet")))
    assert not final.exists()
    assert debris(home), "the kill came after the temporary directory was gone"

    # Killed with the output complete but not yet published: still nothing is published.
    assert run(args, kill_at="publish.before")[0] == KILLED
    assert not final.exists()
    unpublished = [p for p in debris(home) if (p / "manifest.json").is_file()]
    assert len(unpublished) == 1
    expected = tables(unpublished[0])

    # The next run sweeps both leftovers and publishes what the killed run would have.
    code, out = run(args)
    assert code == 0, out[-3000:]
    assert debris(home) == []
    assert tables(final) == expected

    # Killed right after the swap of a re-run: the new version is in place and complete.
    assert run(args, kill_at="publish.after")[0] == KILLED
    assert json.loads((final / "manifest.json").read_text())["ds"] == DS
    assert tables(final) == expected
    assert len(debris(home)) == 1  # the old version, swept by the next writer


def test_model_export_and_soft_targets_killed_then_rerun(catalog, features):
    common = ["--ds", DS, "--data-root", str(catalog.root), *SETS]
    teachers = catalog.models_root / "teacher"

    # The teacher, killed after training with its export complete but unpublished.
    assert run(["-m", "pipeline.steps.train_teacher", *common], kill_at="publish.before")[0] == KILLED
    assert [p for p in teachers.iterdir() if not DEBRIS.match(p.name)] == []
    (unpublished,) = debris(teachers)
    killed_meta = json.loads((unpublished / "metadata.json").read_text())
    code, out = run(["-m", "pipeline.steps.train_teacher", *common])
    assert code == 0, out[-3000:]
    assert debris(teachers) == []
    (teacher,) = teachers.iterdir()
    meta = json.loads((teacher / "metadata.json").read_text())
    assert (teacher / "saved_model" / "saved_model.pb").is_file()
    for key in ("version", "metrics", "best_epoch"):
        assert meta[key] == killed_meta[key]
    assert [{**e, "seconds": 0} for e in meta["history"]] == [{**e, "seconds": 0} for e in killed_meta["history"]]

    # Soft targets: published once, then a re-run killed after its swap, then one more run.
    code, out = run(["-m", "pipeline.steps.soft_targets", *common])
    assert code == 0, out[-3000:]
    (soft_targets,) = (catalog.soft_targets_root / f"ds={DS}").iterdir()
    expected = tables(soft_targets)
    assert run(["-m", "pipeline.steps.soft_targets", *common], kill_at="publish.after")[0] == KILLED
    assert tables(soft_targets) == expected and (soft_targets / "manifest.json").is_file()
    assert len(debris(soft_targets.parent)) == 1
    code, out = run(["-m", "pipeline.steps.soft_targets", *common])
    assert code == 0, out[-3000:]
    assert debris(soft_targets.parent) == []
    assert tables(soft_targets) == expected


@pytest.mark.parametrize("kill_at", ["promote.published", "promote.champion_written"])
def test_promotion_killed_then_rerun_completes_it(tmp_path, kill_at):
    model = saved_model(tmp_path)
    root = tmp_path / "registry"
    code = (f"from pipeline.registry import Registry\n"
            f"Registry({str(root)!r}).promote({str(model)!r}, {{'run_key': 'k1', 'run_id': 'r1'}})")
    assert run(["-c", code], kill_at=kill_at)[0] == KILLED
    registry = Registry(root)
    assert registry.versions() == [1]
    assert (root / "recsys_student" / "1" / "saved_model.pb").read_bytes() == b"graph"

    status, out = run(["-c", code])
    assert status == 0, out
    assert (registry.versions(), registry.champion()) == ([1], 1)
    assert [(e["action"], e["version"]) for e in registry.champion_log() if e["action"] == "promote"] == [("promote", 1)]
    assert "versions: 1\n" in (root / "models.config").read_text()  # serving pinned to it, even when killed before
    assert debris(registry.path) == []

    # Once completed, a further re-run is an ordinary re-run: it adds nothing.
    status, _ = run(["-c", code])
    assert status == 0
    assert registry.versions() == [1]
    assert [e["action"] for e in registry.champion_log()][-1] == "rerun"
    assert [e["action"] for e in registry.champion_log()].count("promote") == 1
