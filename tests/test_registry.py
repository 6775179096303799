"""Registry: growing versions, re-runs that leave the champion alone, crash safety, rollback,
the lock under real concurrency, append-only journals, TF Serving's models.config, CLI."""

import json
import multiprocessing

import pytest

from pipeline import registry as registry_module
from pipeline.config import load_config
from pipeline.io import append_jsonl, read_jsonl
from pipeline.records import ModelMetadata
from pipeline.registry import Promotion, Registry, RegistryError
from pipeline.registry.tf_serving import quote
from pipeline.steps import run as run_module
from pipeline.steps.summary import main as summary_main
from tests.helpers import saved_model

JOIN_TIMEOUT_S = 120  # a deadlocked lock fails the test instead of hanging it


def lineage(run_key, ndcg=0.2, run_id=None):
    return {"run_key": run_key, "ds": run_key.split("_")[0], "metrics": {"ndcg@10": ndcg}, "teacher_version": "t1", "run_id": run_id}


def run_record(run_key, decision, **extra):
    return {"run_key": run_key, "ds": run_key.split("_")[0], "config_hash": run_key.split("_")[1], "decision": decision,
            "reasons": [] if decision == "BLESSED" else ["ndcg@10 below the teacher"], **extra}


def serving_config(base_path, version, name="recsys_student"):
    return (f'  config {{\n    name: "{name}"\n    base_path: "{base_path}"\n    model_platform: "tensorflow"\n'
            f"    model_version_policy {{\n      specific {{\n        versions: {version}\n      }}\n    }}\n  }}\n")


def test_versions_grow_and_champion_follows(tmp_path):
    reg = Registry(tmp_path / "registry")
    assert reg.versions() == [] and reg.champion() is None
    assert reg.promote(saved_model(tmp_path), lineage("2024-01-01_a")) == Promotion(1, 1, rerun=False)
    assert reg.promote(saved_model(tmp_path, "sm2"), lineage("2024-01-02_a", 0.3)).version == 2
    assert reg.versions() == [1, 2] and reg.champion() == 2
    assert reg.lineage(reg.champion())["metrics"] == {"ndcg@10": 0.3}
    # TF Serving layout: the SavedModel files sit directly in the version directory.
    assert (reg.path / "2" / "saved_model.pb").read_bytes() == b"graph"
    assert reg.lineage(2)["version"] == 2 and reg.lineage(2)["teacher_version"] == "t1"


def test_rerun_after_rollback_keeps_the_rolled_back_champion(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.promote(saved_model(tmp_path), lineage("2024-01-01_a"))
    reg.promote(saved_model(tmp_path, "sm2"), lineage("2024-01-02_a", run_id="scheduled__2024-01-02"))
    assert reg.rollback(reason="version 2 hurts CTR") == 1
    # A manual trigger of the same ds and settings: no new version, and the rollback holds.
    rerun = reg.promote(saved_model(tmp_path, "sm3"), lineage("2024-01-02_a", run_id="manual__1"))
    assert rerun == Promotion(version=2, champion=1, rerun=True)
    assert reg.versions() == [1, 2] and reg.champion() == 1
    log = reg.champion_log()
    assert [(e["action"], e["previous"], e["version"]) for e in log] == [
        ("promote", None, 1), ("promote", 1, 2), ("rollback", 2, 1), ("rerun", 1, 1)]
    assert log[2]["reason"] == "version 2 hurts CTR"
    assert log[3]["run_id"] == "manual__1" and "version 2 was published before; champion stays 1" in log[3]["reason"]
    # Only the next new blessed run moves the champion again.
    assert reg.promote(saved_model(tmp_path, "sm4"), lineage("2024-01-03_a")) == Promotion(3, 3, rerun=False)


@pytest.mark.parametrize("crash_in", ["fsync_tree", "rename"])
def test_crash_mid_promotion_leaves_no_partial_version_and_champion_unchanged(tmp_path, monkeypatch, crash_in):
    reg = Registry(tmp_path / "registry")
    reg.promote(saved_model(tmp_path), lineage("2024-01-01_a"))

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    if crash_in == "rename":
        monkeypatch.setattr(registry_module.store.os, "rename", crash)
    else:
        monkeypatch.setattr(registry_module.store, crash_in, crash)
    with pytest.raises(OSError, match="simulated crash"):
        reg.promote(saved_model(tmp_path, "sm2"), lineage("2024-01-02_a"))
    monkeypatch.undo()
    assert reg.versions() == [1] and reg.champion() == 1 and len(reg.champion_log()) == 1
    # No temporary directory left behind.
    assert sorted(p.name for p in reg.path.iterdir()) == [".lock", "1", "champion.json", "champion_log.jsonl"]
    # The crash released the lock: the next promotion goes through.
    assert reg.promote(saved_model(tmp_path, "sm3"), lineage("2024-01-02_a")).version == 2


def test_rollback_and_errors(tmp_path, capsys):
    reg = Registry(tmp_path / "registry")
    with pytest.raises(RegistryError, match="recsys_student has no versions under .*: nothing to roll back to"):
        reg.rollback()
    assert not reg.path.exists()
    reg.promote(saved_model(tmp_path, "sm1"), lineage("2024-01-01_a"))
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()
    for n in range(2, 4):
        reg.promote(saved_model(tmp_path, f"sm{n}"), lineage(f"2024-01-0{n}_a"))
    assert reg.rollback() == 2 and reg.champion() == 2
    assert reg.rollback(3) == 3 and reg.champion() == 3
    with pytest.raises(RegistryError, match=r"has no version 9 \(have \[1, 2, 3\]\)"):
        reg.rollback(9)
    assert reg.champion() == 3
    # The CLI lists, shows and rolls back; the rollback and its reason are journaled.
    root = str(tmp_path / "registry")
    assert registry_module.main(["--registry", root, "rollback", "1", "--reason", "bad CTR"]) == 0
    assert Registry(root).champion() == 1
    assert reg.champion_log()[-1] | {"at": None} == {"at": None, "action": "rollback", "previous": 3, "version": 1, "reason": "bad CTR",
                                                     "history": [1, 2, 3]}
    assert registry_module.main(["--registry", root, "show", "2"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["run_key"] == "2024-01-02_a"
    reg.record_run(run_record("2024-01-02_a", "NOT_BLESSED", run_id="manual__2"))
    assert registry_module.main(["--registry", root, "list"]) == 0
    out = capsys.readouterr().out
    assert "      1  *" in out and "2024-01-02_a [manual__2]: NOT_BLESSED ndcg@10 below the teacher" in out
    assert "rollback: 3 -> 1 (bad CTR)" in out
    assert registry_module.main(["--registry", root, "show", "7"]) == 1
    assert registry_module.main(["--registry", root, "rollback", "7"]) == 1 and Registry(root).champion() == 1


def test_run_records_are_append_only(tmp_path):
    reg = Registry(tmp_path / "registry")
    legacy = run_record("2023-12-31_a", "BLESSED")  # one file per run_key, from before the journal
    (reg.path / "runs").mkdir(parents=True)
    (reg.path / "runs" / "2023-12-31_a.json").write_text(json.dumps(legacy))
    blessed = reg.record_run(run_record("2024-01-01_a", "BLESSED", version=1, run_id="scheduled__2024-01-01"))
    rejected = reg.record_run(run_record("2024-01-01_a", "NOT_BLESSED"))
    other = reg.record_run(run_record("2024-01-02_a", "BLESSED", version=2))
    # The NOT_BLESSED re-run is added after the BLESSED record, which stays as it was.
    assert reg.runs() == [legacy, blessed, rejected, other]
    assert reg.runs("2024-01-01_a") == [blessed, rejected]
    assert blessed["decision"] == "BLESSED" and blessed["version"] == 1 and blessed["run_id"] == "scheduled__2024-01-01"
    assert rejected["version"] is None and rejected["run_id"].startswith("local-") and other["run_id"] != rejected["run_id"]
    assert blessed["at"] < rejected["at"] < other["at"] and blessed["at"].endswith("+00:00")
    with pytest.raises(RegistryError, match=r"lacks \['config_hash', 'decision', 'reasons'\]"):
        reg.record_run({"run_key": "2024-01-03_a", "ds": "2024-01-03"})
    assert len(reg.runs()) == 4


def test_a_torn_journal_line_costs_only_itself(tmp_path):
    journal = tmp_path / "log.jsonl"
    append_jsonl(journal, {"n": 1})
    with open(journal, "a") as handle:
        handle.write('{"n": 2, "tor')  # a crash mid-append
    append_jsonl(journal, {"n": 3})
    assert read_jsonl(journal) == [{"n": 1}, {"n": 3}]


def test_models_config_pins_the_champion_and_follows_rollback(tmp_path):
    root = tmp_path / "registry"
    reg = Registry(root)
    base = (root / "recsys_student").resolve()
    reg.promote(saved_model(tmp_path), lineage("2024-01-01_a"))
    reg.promote(saved_model(tmp_path, "sm2"), lineage("2024-01-02_a"))
    config = root / "models.config"
    assert config.read_text() == "model_config_list {\n" + serving_config(base, 2) + "}\n"
    reg.rollback()
    assert config.read_text() == "model_config_list {\n" + serving_config(base, 1) + "}\n"
    reg.promote(saved_model(tmp_path, "sm3"), lineage("2024-01-02_a"))  # a re-run: still pinned to 1
    assert "versions: 1\n" in config.read_text()
    # A second model of the same root is listed beside the first, in name order.
    Registry(root, "a_model").promote(saved_model(tmp_path, "sm4"), lineage("2024-01-01_b"))
    both = "model_config_list {\n" + serving_config((root / "a_model").resolve(), 1, "a_model") + serving_config(base, 1) + "}\n"
    assert config.read_text() == both
    assert sorted(p.name for p in root.iterdir()) == [".models.config.lock", "a_model", "models.config", "recsys_student"]
    # A registry written before models.config existed gets one from the CLI.
    config.unlink()
    assert registry_module.main(["--registry", str(root), "serving-config"]) == 0
    assert config.read_text() == both
    assert quote('a"b\\c') == '"a\\"b\\\\c"'


def promote_many(root, saved_model_dir, run_keys, barrier):
    barrier.wait()  # every process starts together, so their registry operations overlap
    reg = Registry(root)
    for run_key in run_keys:
        promotion = reg.promote(saved_model_dir, lineage(run_key, run_id=f"run-{run_key}"))
        reg.record_run(run_record(run_key, "BLESSED", version=promotion.version))


def roll_back_to_first(root, times, barrier):
    barrier.wait()
    for _ in range(times):
        Registry(root).rollback(1, reason="operator")


def test_concurrent_promoters_get_distinct_versions_and_lose_no_champion_change(tmp_path):
    root, model = tmp_path / "registry", saved_model(tmp_path)
    reg = Registry(root)
    reg.promote(model, lineage("2024-01-01_seed"))
    promoters, per_promoter, rollbacks = 4, 3, 10
    keys = [[f"2024-02-0{p + 1}_{n}" for n in range(per_promoter)] for p in range(promoters)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(promoters + 1)
    processes = [ctx.Process(target=promote_many, args=(root, model, k, barrier)) for k in keys]
    processes.append(ctx.Process(target=roll_back_to_first, args=(root, rollbacks, barrier)))
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, "a registry operation hung (lock never released?)"
    assert [p.exitcode for p in processes] == [0] * len(processes)

    # 1 seed + 4 promoters x 3 = 13 versions, each run_key its own.
    assert reg.versions() == list(range(1, 14))
    assert sorted(reg.find(k) for ks in keys for k in ks) == list(range(2, 14))
    log = reg.champion_log()
    assert sorted(e["version"] for e in log if e["action"] == "promote") == list(range(1, 14))
    assert [e["action"] for e in log].count("rollback") == rollbacks
    # No lost update: every change started from the champion the change before it left.
    assert [e["previous"] for e in log[1:]] == [e["version"] for e in log[:-1]]
    # champion.json is the last change, its rollback stack every champion that was replaced.
    record = json.loads((reg.path / "champion.json").read_text())
    assert record["version"] == log[-1]["version"]
    assert record["history"] == [e["previous"] for e in log if e["previous"] not in (None, e["version"])]
    assert f"versions: {record['version']}\n" in (root / "models.config").read_text()
    assert sorted(r["version"] for r in reg.runs()) == list(range(2, 14))


def test_run_steps_record_every_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path / "data"))
    cfg = load_config({})
    ds = "2024-01-02"
    run = {"ds": ds, "data_root": str(tmp_path / "data"), "overrides": {}, "config": cfg.to_dict(),
           "config_hash": cfg.config_hash(), "run_key": run_module.run_key(ds, cfg), "run_id": "scheduled__2024-01-02"}
    student_dir = tmp_path / "data" / "models" / "student" / "s1"
    teacher, student = {"version": "t1", "path": "teacher"}, {"path": str(student_dir), "soft_targets": "st"}
    saved_model(student_dir, "saved_model")
    features = tmp_path / "data" / "features" / f"ds={ds}"
    features.mkdir(parents=True)
    (features / "manifest.json").write_text(json.dumps({"ds": ds, "config": {}, "counts": {}, "tables": {}}))
    evaluation = {"models": {"student_kd": {"ndcg@10": 0.3}, "teacher": {"ndcg@10": 0.31}}}
    blessed = {"blessed": True, "decision": "BLESSED", "reasons": [], "champion_version": None}
    rejected = {"blessed": False, "decision": "NOT_BLESSED", "reasons": ["ndcg@10 -3.23% < allowed -2.00%"]}
    registry = str(tmp_path / "data" / "registry" / "recsys_student")
    assert run_module.promote(run, teacher, student, evaluation, blessed) == {
        "version": 1, "registry": registry, "champion": 1, "rerun": False, "promoted": True, "reason": ""}
    with pytest.raises(ValueError, match="refusing to promote"):
        run_module.promote(run, teacher, student, evaluation, rejected)
    run_module.record_rejection({**run, "run_id": "manual__1"}, teacher, student, evaluation, rejected)
    assert run_module.promote({**run, "run_id": "manual__2"}, teacher, student, evaluation, {**blessed, "champion_version": 1}) == {
        "version": 1, "registry": registry, "champion": 1, "rerun": True, "promoted": True, "reason": ""}
    runs = Registry(tmp_path / "data" / "registry").runs()
    assert [(r["run_id"], r["decision"], r["version"]) for r in runs] == [
        ("scheduled__2024-01-02", "BLESSED", 1), ("manual__1", "NOT_BLESSED", None), ("manual__2", "BLESSED", 1)]
    assert {(r["ds"], r["config_hash"], r["run_key"]) for r in runs} == {(ds, cfg.config_hash(), run["run_key"])}
    assert runs[1]["reasons"] == rejected["reasons"]


def test_every_attempt_keeps_its_own_report_and_the_summary_shows_the_latest(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path / "data"))
    cfg = load_config({})
    ds = "2024-01-02"
    data_root = tmp_path / "data"
    run = {"ds": ds, "data_root": str(data_root), "overrides": {}, "config": cfg.to_dict(),
           "config_hash": cfg.config_hash(), "run_key": run_module.run_key(ds, cfg)}
    for name in ("teacher", "student"):
        (data_root / "models" / name / "v1").mkdir(parents=True)
        ModelMetadata(version="v1", ds=ds, role=name, config={}, config_hash="h", trainable_params=1, metrics={},
                      best_epoch=1, history=[{"epoch": 1, "loss": 1.0}], seconds=1.0).save(data_root / "models" / name / "v1")
    teacher = {"version": "t1", "path": str(data_root / "models" / "teacher" / "v1")}
    student = {"path": str(data_root / "models" / "student" / "v1")}
    features = data_root / "features" / f"ds={ds}"
    features.mkdir(parents=True)
    (features / "manifest.json").write_text(json.dumps({"ds": ds, "config": {}, "tables": {}, "counts": {"interactions_by_split": {}}}))
    evaluation = {"models": {"student_kd": {"ndcg@10": 0.3}, "teacher": {"ndcg@10": 0.31}}}
    outcomes = {"scheduled__2024-01-02T02:00:00+00:00": {"blessed": True, "decision": "BLESSED", "reasons": [], "warnings": []},
                "manual__2024-01-02T09:00:00+00:00": {"blessed": False, "decision": "NOT_BLESSED", "warnings": [],
                                                      "reasons": ["ndcg@10 -3.23% < allowed -2.00%"]}}
    registry = Registry(data_root / "registry")
    for run_id, gate in outcomes.items():
        registry.record_run(run_record(run["run_key"], gate["decision"], run_id=run_id, features=str(features)))
        run_module.write_run_report({**run, "run_id": run_id}, teacher, student, evaluation, gate, None)

    reports = sorted((data_root / "reports" / f"ds={ds}" / run["run_key"]).glob("*/summary.json"))
    assert sorted(json.loads(p.read_text())["gate"]["decision"] for p in reports) == ["BLESSED", "NOT_BLESSED"]
    assert summary_main(["--ds", ds, "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "attempt manual__2024-01-02T09:00:00+00:00 of 2" in out and "NOT_BLESSED" in out
