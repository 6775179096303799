"""What the registry serves: TF Serving's ``models.config`` (which version of each model the
model server loads) and ``serving.json`` (the same champions, with their faiss serving indexes).

TF Serving's default version policy serves the highest version directory and never reads
the registry's champion alias, so a rollback would change nothing that is served. This
``ModelServerConfig`` pins each model to its champion with a ``specific`` version policy;
``tensorflow_model_server --model_config_file=... --model_config_file_poll_wait_seconds=N``
re-reads it and loads the pinned version (then unloads the old one) on every change.
``serving.json`` tells a faiss server (:class:`pipeline.serving.ServingModel`) the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from pipeline.serving.index import SERVING_INDEX_DIR, read_index_record

MODEL_PLATFORM = "tensorflow"
SERVING_MANIFEST = "serving.json"


def quote(text: str) -> str:
    """``text`` as a text-protobuf string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def models_config(champions: Mapping[str, tuple[Path, int]]) -> str:
    """A ``ModelServerConfig`` (text protobuf) that serves exactly one version of each model.

    Args:
        champions: Model name -> (directory holding its numbered versions, champion version).
            The directory is written as an absolute ``base_path``, so the model server must
            see the registry at the same path as the pipeline.

    Returns:
        The file's text, models in name order (the same champions give the same bytes).
    """
    entries = "".join(
        "  config {\n"
        f"    name: {quote(name)}\n"
        f"    base_path: {quote(str(Path(base_path).resolve()))}\n"
        f"    model_platform: {quote(MODEL_PLATFORM)}\n"
        "    model_version_policy {\n"
        "      specific {\n"
        f"        versions: {int(version)}\n"
        "      }\n"
        "    }\n"
        "  }\n"
        for name, (base_path, version) in sorted(champions.items()))
    return f"model_config_list {{\n{entries}}}\n"


def serving_manifest(champions: Mapping[str, tuple[Path, int]]) -> dict:
    """What ``serving.json`` says: each model's champion, its SavedModel and its faiss serving index.

    Args:
        champions: As for :func:`models_config`; each directory is ``<registry>/<model>``.

    Returns:
        ``{"models": {name: {"champion", "saved_model", "serving_index", "index"}}}``, paths
        relative to the registry root (the file's own directory, wherever it is mounted):
        ``saved_model`` is the version directory TF Serving loads (the query tower and TF's
        top-K), ``serving_index`` its ``serving_index/`` and ``index`` that index's record
        (both None for a version exported before serving indexes).
    """
    models = {}
    for name, (base_path, version) in sorted(champions.items()):
        version_dir = Path(base_path) / str(int(version))
        has_index = (version_dir / SERVING_INDEX_DIR).is_dir()
        models[name] = {
            "champion": int(version),
            "saved_model": f"{Path(base_path).name}/{int(version)}",
            "serving_index": f"{Path(base_path).name}/{int(version)}/{SERVING_INDEX_DIR}" if has_index else None,
            "index": read_index_record(version_dir) if has_index else None,
        }
    return {"models": models}
