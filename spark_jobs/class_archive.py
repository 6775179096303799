"""Build the class archive that local Spark driver JVMs start from (AppCDS, JDK 13+).

``python -m spark_jobs.class_archive`` (run by ``make install``) runs the feature job, GX on,
once on a small synthetic window in a JVM that records every class it loads, and writes the
archive to :data:`pipeline.spark.CLASS_ARCHIVE` (about 170 MB, never committed). Every driver
JVM that :func:`pipeline.spark.spark_session` starts then maps those classes instead of
loading and verifying them from the jars again; classes the recording did not load are
loaded as before. Without the archive nothing changes; one left from another JDK or other
jars is refused by the JVM with a warning on stderr, and the session starts as without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from pipeline.io import atomic_file
from pipeline.spark import CLASS_ARCHIVE, JAVA_OPTIONS

log = logging.getLogger("class_archive")

# A window that makes the job run every kind of query it runs at scale, in a few seconds.
WINDOW_END, WINDOW_DAYS, EVENTS, USERS, ITEMS, SEED = dt.date(2024, 1, 31), 3, 20_000, 300, 200, 7


def record(archive: Path) -> None:
    """Run the feature job once in a driver JVM that writes the classes it loaded to ``archive`` when it exits.

    Returns after the JVM has exited, so the archive is complete.
    """
    from pyspark import SparkContext

    from pipeline.config import load_config
    from pipeline.data.synthetic import generate_synthetic_logs
    from pipeline.spark import spark_session
    from spark_jobs.extract_features import run, session_conf

    cfg = load_config({"features": {"window_days": WINDOW_DAYS}}).features
    with tempfile.TemporaryDirectory() as scratch:
        raw_root = Path(scratch) / "raw"
        generate_synthetic_logs(raw_root, USERS, ITEMS, WINDOW_DAYS, EVENTS, SEED, WINDOW_END)
        # Only errors: the dump warns of every class it skips (generated ones, signed jars).
        conf = {**session_conf(cfg), JAVA_OPTIONS: f'-XX:ArchiveClassesAtExit="{archive}" -Xlog:disable -Xlog:all=error:stderr'}
        spark = spark_session("class_archive", "local[2]", cfg.shuffle_partitions, conf=conf)
        jvm = SparkContext._gateway.proc  # the JVM writes the archive as it exits
        try:
            run(spark, raw_root, Path(scratch) / "features", WINDOW_END, cfg)
        finally:
            spark.stop()
            SparkContext._gateway.shutdown()
            jvm.stdin.close()  # pyspark's gateway JVM exits when its stdin closes
            jvm.wait(timeout=600)


def main(argv: Sequence[str] | None = None) -> int:
    """Build :data:`~pipeline.spark.CLASS_ARCHIVE`; it appears complete or not at all."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # the child process's task
    args = parser.parse_args(argv)
    if args.record:
        record(args.record)
        return 0
    try:
        with atomic_file(CLASS_ARCHIVE) as partial:
            # In a child process: a JVM started by this one would map the archive being replaced.
            subprocess.run([sys.executable, "-m", "spark_jobs.class_archive", "--record", str(partial)], check=True,
                           cwd=Path(__file__).resolve().parents[1])
            if not partial.stat().st_size:
                raise FileNotFoundError(partial)
    except FileNotFoundError:
        log.error("the JVM wrote no class archive to %s", CLASS_ARCHIVE)
        return 1
    log.info("wrote %s (%.0f MB)", CLASS_ARCHIVE, CLASS_ARCHIVE.stat().st_size / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
