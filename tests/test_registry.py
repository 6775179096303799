"""Registry: growing versions, idempotent promotion, crash safety, rollback, CLI."""

import json

import pytest

from pipeline import registry as registry_module
from pipeline.registry import Registry, RegistryError


def saved_model(tmp_path, name="sm", payload=b"graph"):
    path = tmp_path / name
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(payload)
    (path / "variables" / "variables.index").write_bytes(b"index")
    return path


def lineage(run_key, ndcg=0.2):
    return {"run_key": run_key, "ds": run_key.split("_")[0], "metrics": {"ndcg@10": ndcg}, "teacher_version": "t1"}


def test_versions_grow_and_champion_follows(tmp_path):
    reg = Registry(tmp_path / "registry")
    assert reg.versions() == [] and reg.champion() is None
    assert reg.promote(saved_model(tmp_path), lineage("2024-01-01_a")) == 1
    assert reg.promote(saved_model(tmp_path, "sm2"), lineage("2024-01-02_a", 0.3)) == 2
    assert reg.versions() == [1, 2] and reg.champion() == 2
    assert reg.lineage(reg.champion())["metrics"] == {"ndcg@10": 0.3}
    # TF Serving layout: the SavedModel files sit directly in the version directory.
    assert (reg.path / "2" / "saved_model.pb").read_bytes() == b"graph"
    assert reg.lineage(2)["version"] == 2 and reg.lineage(2)["teacher_version"] == "t1"


def test_rerun_of_same_ds_and_config_creates_no_duplicate(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.promote(saved_model(tmp_path), lineage("2024-01-01_a"))
    reg.promote(saved_model(tmp_path, "sm2"), lineage("2024-01-02_a"))
    reg.rollback()  # champion back to 1
    assert reg.promote(saved_model(tmp_path, "sm3"), lineage("2024-01-02_a")) == 2
    assert reg.versions() == [1, 2] and reg.champion() == 2


@pytest.mark.parametrize("crash_in", ["fsync_tree", "rename"])
def test_crash_mid_promotion_leaves_no_partial_version_and_champion_unchanged(tmp_path, monkeypatch, crash_in):
    reg = Registry(tmp_path / "registry")
    reg.promote(saved_model(tmp_path), lineage("2024-01-01_a"))

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    if crash_in == "rename":
        monkeypatch.setattr(registry_module.os, "rename", crash)
    else:
        monkeypatch.setattr(registry_module, crash_in, crash)
    with pytest.raises(OSError, match="simulated crash"):
        reg.promote(saved_model(tmp_path, "sm2"), lineage("2024-01-02_a"))
    monkeypatch.undo()
    assert reg.versions() == [1] and reg.champion() == 1
    assert sorted(p.name for p in reg.path.iterdir()) == ["1", "champion.json"]  # no temporary directory left


def test_rollback_and_errors(tmp_path, capsys):
    reg = Registry(tmp_path / "registry")
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()
    for n in range(1, 4):
        reg.promote(saved_model(tmp_path, f"sm{n}"), lineage(f"2024-01-0{n}_a"))
    assert reg.rollback() == 2 and reg.champion() == 2
    assert reg.rollback(3) == 3 and reg.champion() == 3
    with pytest.raises(RegistryError, match=r"has no version 9 \(have \[1, 2, 3\]\)"):
        reg.set_champion(9)
    # The CLI lists, shows and rolls back.
    root = str(tmp_path / "registry")
    assert registry_module.main(["--registry", root, "rollback", "1"]) == 0
    assert Registry(root).champion() == 1
    assert registry_module.main(["--registry", root, "show", "2"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["run_key"] == "2024-01-02_a"
    assert registry_module.main(["--registry", root, "list"]) == 0
    assert "      1  *" in capsys.readouterr().out
    assert registry_module.main(["--registry", root, "show", "7"]) == 1


def test_run_records_are_rewritten_not_duplicated(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.record_run("2024-01-01_a", {"decision": "NOT_BLESSED", "reasons": ["x"]})
    reg.record_run("2024-01-01_a", {"decision": "BLESSED", "reasons": []})
    assert reg.runs() == [{"run_key": "2024-01-01_a", "decision": "BLESSED", "reasons": []}]
