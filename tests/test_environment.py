"""The environment the pins promise: one pyspark, legacy Keras for TFRS."""

import os
import subprocess
import sys
from pathlib import Path


def fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` run by this interpreter in a new process, outside the repository, without TF_USE_LEGACY_KERAS."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
                          capture_output=True, text=True, timeout=300)


def test_pyspark_python_matches_the_jvm(spark):
    # pyspark-client writes its own pyspark files over pyspark's: a version skew shows here.
    import pyspark

    assert pyspark.__version__ == spark.version


def test_the_model_code_runs_on_legacy_keras_for_tfrs(tmp_path):
    # A fresh process (this one imported TensorFlow long ago), outside the repository: the
    # installed package alone must switch TensorFlow to tf_keras before TFRS loads it.
    code = ("from pipeline.modeling.models import build_teacher\n"
            "import tensorflow as tf\n"
            "import tensorflow_recommenders as tfrs\n"
            "print(tf.keras.__name__, isinstance(tfrs.layers.factorized_top_k.BruteForce(), tf.keras.layers.Layer))\n")
    result = fresh_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    name, is_layer = result.stdout.split()[-2:]
    assert name.startswith("tf_keras"), name
    assert is_layer == "True"


def test_importing_tensorflow_before_pipeline_is_refused(tmp_path):
    result = fresh_python("import tensorflow\nimport pipeline\n", tmp_path)
    assert result.returncode != 0
    assert "ImportError: TensorFlow was imported before `pipeline`" in result.stderr, result.stderr[-3000:]


def test_the_class_archive_is_mapped_after_the_given_java_options_when_it_exists(tmp_path):
    from pipeline.spark import JAVA_OPTIONS, with_class_archive

    archive = tmp_path / "classes.jsa"
    conf = {JAVA_OPTIONS: "-Xss64m", "spark.ui.enabled": "false"}
    assert with_class_archive(conf, archive) == conf  # no archive: nothing added
    archive.write_bytes(b"")
    mapped = with_class_archive(conf, archive)
    assert mapped[JAVA_OPTIONS].startswith(f'-XX:SharedArchiveFile="{archive}" ')
    assert mapped[JAVA_OPTIONS].endswith(" -Xss64m")  # the caller's options last: its own -Xlog settings win
    assert mapped["spark.ui.enabled"] == "false"
    assert "-Xlog:all=warning:stderr" in mapped[JAVA_OPTIONS]  # a refused archive warns on stderr, not in a job's stdout
    recording = {JAVA_OPTIONS: f"-XX:ArchiveClassesAtExit={tmp_path / 'new.jsa'}"}
    assert with_class_archive(recording, archive) == recording  # a JVM that records an archive maps none


def test_a_driver_jvm_loads_spark_from_the_installed_class_archive(tmp_path):
    from pipeline.spark import CLASS_ARCHIVE

    assert CLASS_ARCHIVE.exists(), f"no class archive at {CLASS_ARCHIVE}: `make install` builds it"
    # A fresh JVM (this process has one already) that logs where each class came from: a
    # refused archive, or -Xlog:disable overriding the caller's logging, fails here.
    loaded = tmp_path / "classes.log"
    script = ("from pipeline.spark import spark_session, JAVA_OPTIONS\n"
              f"s = spark_session('archive', 'local[1]', 1, conf={{JAVA_OPTIONS: '-Xlog:class+load=info:file={loaded}'}})\n"
              "s.range(3).count()\ns.stop()\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    lines = loaded.read_text().splitlines()
    assert any("org.apache.spark.SparkContext source: shared objects file (top)" in line for line in lines)
