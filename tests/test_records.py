"""The catalogue's typed records: what a load gives, what a save writes, and the errors."""

from __future__ import annotations

import json
import os
import stat

import pytest

from pipeline.io import write_text
from pipeline.records import ArtifactNotFound, FeatureManifest, ModelMetadata, RecordError, SoftTargetManifest

TEACHER = {
    "version": "2024-01-31-abc", "ds": "2024-01-31", "role": "teacher", "config": {"training": {"refit": True}},
    "config_hash": "h", "trainable_params": 1234, "metrics": {"validation": {"recall@20": 0.5}}, "best_epoch": 2,
    "history": [{"epoch": 1}, {"epoch": 2}], "seconds": 1.5, "tensorboard": "tensorboard",
    "features_manifest": {"raw_events": 10}, "runtime": {"threads": 2},  # not named by the record: kept as they are
}


def test_a_model_metadata_loads_its_named_fields_and_saves_every_key_it_read(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps(TEACHER))
    meta = ModelMetadata.load(tmp_path)
    assert (meta.version, meta.trainable_params, meta.best_epoch, meta.tensorboard) == ("2024-01-31-abc", 1234, 2, "tensorboard")
    assert meta.refitted and meta.teacher_version is None
    assert meta.extra == {"features_manifest": {"raw_events": 10}, "runtime": {"threads": 2}}
    meta.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "metadata.json").read_text()) == TEACHER


def test_a_record_missing_a_field_names_the_file_and_the_field(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"ds": "2024-01-31", "teacher_version": "t", "k": 5}))
    with pytest.raises(RecordError, match=r"manifest\.json: missing field\(s\) dim, logit_scale, users, items of a soft targets"):
        SoftTargetManifest.load(tmp_path)


def test_a_record_that_is_not_a_json_object_is_refused_with_its_path(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(RecordError, match=r"manifest\.json: a JSON object expected, got list"):
        FeatureManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RecordError, match="not JSON"):
        FeatureManifest.load(tmp_path)


def test_an_unpublished_artifact_says_which_step_writes_it(tmp_path):
    with pytest.raises(ArtifactNotFound, match="no published features at .*: run extract_features first"):
        FeatureManifest.load(tmp_path)
    with pytest.raises(ArtifactNotFound, match="run soft_targets first"):
        SoftTargetManifest.load(tmp_path)
    assert not ModelMetadata.exists(tmp_path)


def test_a_feature_manifest_gives_its_splits_and_table_rows(tmp_path):
    manifest = FeatureManifest.from_dict({
        "ds": "2024-01-31", "config": {}, "counts": {"interactions_by_split": {"train": 8, "validation": 1, "test": 1}},
        "tables": {"users": {"rows": 3, "schema": []}, "items": {"rows": 4, "schema": []}}})
    assert manifest.interactions_by_split == {"train": 8, "validation": 1, "test": 1}
    assert manifest.table_rows == {"users": 3, "items": 4}
    assert manifest.validation is None and "validation" not in manifest.to_dict()


def test_an_atomic_write_with_a_private_mode_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        written = write_text(tmp_path / "secret", "s3cret", mode=0o600)
        public = write_text(tmp_path / "public", "hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert written.read_text() == "s3cret" and sorted(p.name for p in tmp_path.iterdir()) == ["public", "secret"]


def test_records_are_read_only_through_the_catalogue_and_written_only_through_io():
    """No module outside pipeline/records.py opens a metadata.json or manifest.json by hand, and
    no module outside pipeline/io.py renames a temporary file over its destination."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    by_hand = re.compile(r"json\.loads\(.*(METADATA|MANIFEST|metadata\.json|manifest\.json)")
    swaps = re.compile(r"os\.replace\(|tempfile\.mkstemp\(")
    found = []
    for folder in ("pipeline", "spark_jobs", "deploy", "dags", "plugins"):
        for path in sorted((repo / folder).rglob("*.py")):
            name = path.relative_to(repo).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if by_hand.search(line) and name != "pipeline/records.py":
                    found.append(f"{name}:{number}: reads a record by hand: {line.strip()}")
                if swaps.search(line) and name != "pipeline/io.py":
                    found.append(f"{name}:{number}: an atomic write beside pipeline/io.py: {line.strip()}")
    assert found == []
