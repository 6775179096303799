"""TF Serving's ``models.config``: which version of each model the model server loads.

TF Serving's default version policy serves the highest version directory and never reads
the registry's champion alias, so a rollback would change nothing that is served. This
``ModelServerConfig`` pins each model to its champion with a ``specific`` version policy;
``tensorflow_model_server --model_config_file=... --model_config_file_poll_wait_seconds=N``
re-reads it and loads the pinned version (then unloads the old one) on every change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

MODEL_PLATFORM = "tensorflow"


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
