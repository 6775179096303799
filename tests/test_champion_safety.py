"""The champion between runs: promotion is a compare-and-swap against the champion the gate
compared the student with, and a crash at any registry step, followed by a rollback,
another promotion or a re-run, never leaves a worse or an unserved model as champion.

Every scenario runs the real registry code; crashes are real SIGKILLs of a child process at
the registry's crash points (``pipeline.io.crash_point``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.catalog import Catalog, date_partition
from pipeline.config import load_config
from pipeline.io import KILL_AT_ENV
from pipeline.registry import CHAMPION_FILE, MODELS_CONFIG, Registry
from pipeline.steps import run as run_module

REPO = Path(__file__).resolve().parents[1]
JOIN_TIMEOUT_S = 120
KILL_POINTS = ["promote.published", "promote.journaled", "promote.champion_written", "promote.config_written"]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "saved_model"
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"graph")
    return path


def lineage(run_key: str, ndcg: float) -> dict:
    return {"run_key": run_key, "run_id": f"run-{run_key}", "metrics": {"ndcg@10": ndcg}}


def promote_in_child(root: Path, model: Path, run_key: str, ndcg: float, expected, kill_at: str | None = None) -> int:
    """``Registry.promote`` in a process of its own (SIGKILLed at ``kill_at``); its exit code."""
    code = (f"from pipeline.registry import Registry\n"
            f"Registry({str(root)!r}).promote({str(model)!r}, {lineage(run_key, ndcg)!r}, expected_champion={expected!r})")
    env = dict(os.environ)
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=120).returncode


def served_version(root: Path) -> int | None:
    text = (root / MODELS_CONFIG).read_text() if (root / MODELS_CONFIG).is_file() else ""
    found = re.findall(r"versions: (\d+)", text)
    return int(found[0]) if found else None


def assert_consistent(registry: Registry) -> int:
    """champion.json, models.config and the journal's last champion decision name one version; it is returned."""
    record = json.loads((registry.path / CHAMPION_FILE).read_text())
    decisions = [e for e in registry.champion_log() if e["action"] in ("promote", "rollback")]
    assert record["version"] == decisions[-1]["version"] == served_version(registry.root), (
        record, decisions[-1], (registry.root / MODELS_CONFIG).read_text())
    return record["version"]


def test_a_student_gated_against_an_old_champion_is_not_promoted(tmp_path, model_dir):
    registry = Registry(tmp_path / "registry")
    assert registry.promote(model_dir, lineage("2024-01-01_a", 0.15), expected_champion=None).version == 1
    # Two runs were both evaluated against champion 1 (a backfill beside the nightly run).
    better = registry.promote(model_dir, lineage("2024-01-02_a", 0.200), expected_champion=1)
    worse = registry.promote(model_dir, lineage("2024-01-03_a", 0.099), expected_champion=1)
    assert (better.promoted, better.version, better.champion) == (True, 2, 2)
    assert (worse.promoted, worse.version, worse.champion) == (False, None, 2)
    assert worse.reason.startswith("champion changed since evaluation: was version 1, now version 2")
    assert registry.versions() == [1, 2] and assert_consistent(registry) == 2
    refused = registry.champion_log()[-1]
    assert (refused["action"], refused["run_key"], refused["version"], refused["previous"]) == ("refused", "2024-01-03_a", 2, 2)
    # A first run raced by another first run: "no champion" is a champion to compare with too.
    other = Registry(tmp_path / "registry", "other_model")
    assert other.promote(model_dir, lineage("2024-01-01_b", 0.1), expected_champion=None).promoted
    assert other.promote(model_dir, lineage("2024-01-01_c", 0.2), expected_champion=None).reason.startswith(
        "champion changed since evaluation: was no champion, now version 1")


def test_the_gate_names_its_champion_and_the_run_records_a_refused_promotion(tmp_path, model_dir, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(data))
    cfg = load_config({"distill": {"ladder": []}})  # one student, named student_kd
    student_dir = data / "models" / "student" / "s1"
    (student_dir / "saved_model").mkdir(parents=True)
    (student_dir / "saved_model" / "saved_model.pb").write_bytes(b"graph")
    Registry(data / "registry").promote(model_dir, lineage("2024-01-01_x", 0.15))

    def run_of(ds: str) -> dict:
        return {"ds": ds, "data_root": str(data), "overrides": {}, "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
                "run_key": run_module.run_key(ds, cfg), "run_id": f"backfill__{ds}", "features_version": "f1"}

    def evaluation(student: float) -> dict:
        return {"models": {"student_kd": {"ndcg@10": student, "recall@20": student}, "teacher": {"ndcg@10": 0.2, "recall@20": 0.2},
                           "champion": {"ndcg@10": 0.09, "recall@20": 0.09, "version": 1}}}

    for ds in ("2024-01-02", "2024-01-03"):
        features = date_partition(Catalog(data, features_version="f1").features_home, ds)
        features.mkdir(parents=True)
        (features / "manifest.json").write_text(json.dumps({"ds": ds, "config": {}, "counts": {}, "tables": {}}))
    teacher, student = {"version": "t1", "path": "t"}, {"path": str(student_dir)}
    gates = {ds: run_module.decide(run_of(ds), evaluation(ndcg)) for ds, ndcg in (("2024-01-02", 0.200), ("2024-01-03", 0.199))}
    assert [(g["blessed"], g["champion_version"]) for g in gates.values()] == [(True, 1), (True, 1)]
    first = run_module.promote(run_of("2024-01-02"), teacher, student, evaluation(0.200), gates["2024-01-02"])
    second = run_module.promote(run_of("2024-01-03"), teacher, student, evaluation(0.199), gates["2024-01-03"])
    assert (first["promoted"], first["champion"]) == (True, 2)
    assert (second["promoted"], second["version"], second["champion"]) == (False, None, 2)
    assert "champion changed since evaluation: was version 1, now version 2" in second["reason"]
    recorded = Registry(data / "registry").runs(run_of("2024-01-03")["run_key"])[-1]
    assert (recorded["decision"], recorded["promoted"], recorded["version"]) == ("BLESSED", False, None)
    assert recorded["reasons"] == [second["reason"]]
    # A gate result that does not say which champion it compared with promotes nothing.
    gate = {k: v for k, v in gates["2024-01-03"].items() if k != "champion_version"}
    with pytest.raises(ValueError, match="does not name the champion"):
        run_module.promote(run_of("2024-01-03"), teacher, student, evaluation(0.199), gate)


def killed_promotion(tmp_path: Path, model_dir: Path, kill_at: str) -> tuple[Path, Registry]:
    """A registry whose champion is version 1, and run B's promotion (gated against 1) killed at ``kill_at``."""
    root = tmp_path / "registry"
    registry = Registry(root)
    registry.promote(model_dir, lineage("2024-01-01_a", 0.15))
    assert promote_in_child(root, model_dir, "2024-01-02_b", 0.2, 1, kill_at=kill_at) == -signal.SIGKILL
    return root, registry


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_killed_promotion_then_a_rollback_holds(tmp_path, model_dir, kill_at):
    root, registry = killed_promotion(tmp_path, model_dir, kill_at)
    registry.rollback(1, reason="operator: back to 1")
    assert assert_consistent(registry) == 1
    # The killed run's re-run (its promote task retried) never undoes the rollback.
    assert promote_in_child(root, model_dir, "2024-01-02_b", 0.2, 1) == 0
    assert assert_consistent(registry) == 1 and registry.versions() == [1, 2]
    assert registry.champion_log()[-1]["action"] in ("rerun", "refused")


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_killed_promotion_then_another_promotion_keeps_the_newer_champion(tmp_path, model_dir, kill_at):
    root, registry = killed_promotion(tmp_path, model_dir, kill_at)
    # The next run is evaluated against the champion being served (its evaluate reconciles).
    served = registry.reconcile()
    assert served == (1 if kill_at == "promote.published" else 2) and assert_consistent(registry) == served
    assert registry.promote(model_dir, lineage("2024-01-03_c", 0.3), expected_champion=served).version == 3
    assert promote_in_child(root, model_dir, "2024-01-02_b", 0.2, 1) == 0
    assert assert_consistent(registry) == 3


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_killed_promotion_then_its_rerun_ends_as_one_promotion(tmp_path, model_dir, kill_at):
    root, registry = killed_promotion(tmp_path, model_dir, kill_at)
    assert promote_in_child(root, model_dir, "2024-01-02_b", 0.2, 1) == 0
    assert assert_consistent(registry) == 2 and registry.versions() == [1, 2]
    assert [e["version"] for e in registry.champion_log() if e["action"] == "promote"] == [1, 2]


def promote_expecting_first(root, model, run_key, ndcg, barrier, results):
    barrier.wait()  # both start together, so their promotions race for the lock
    promotion = Registry(root).promote(model, lineage(run_key, ndcg), expected_champion=1)
    results.put((run_key, promotion.promoted, promotion.reason))


def test_concurrent_promoters_gated_against_one_champion_promote_once(tmp_path, model_dir):
    root = tmp_path / "registry"
    registry = Registry(root)
    registry.promote(model_dir, lineage("2024-01-01_a", 0.15))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    processes = [ctx.Process(target=promote_expecting_first, args=(root, model_dir, key, ndcg, barrier, results))
                 for key, ndcg in (("2024-01-02_nightly", 0.2), ("2024-01-02_backfill", 0.099))]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in processes] == [0, 0]
    outcomes = sorted(results.get(timeout=5) for _ in processes)
    assert sorted(promoted for _, promoted, _ in outcomes) == [False, True]
    winner = next(key for key, promoted, _ in outcomes if promoted)
    loser_reason = next(reason for _, promoted, reason in outcomes if not promoted)
    assert loser_reason.startswith("champion changed since evaluation: was version 1, now version 2")
    assert registry.versions() == [1, 2] and registry.lineage(2)["run_key"] == winner
    assert assert_consistent(registry) == 2
