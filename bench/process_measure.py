"""Measuring one benchmarked process: wall time, and peak RSS and CPU time of its whole tree.

Every engine is measured the same way by :func:`measure_process`: wall time of the process
(start-up included), and peak RSS and CPU time summed over its process tree (the JVM is a
child of the Spark job's Python), sampled every ``POLL_SECONDS``. :func:`parse_spark_log`
reads the Spark job's own time and its stages off the timestamps of the job's log lines.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

POLL_SECONDS = 0.2
RUN_TIMEOUT_SECONDS = 3600

# Job log messages that close each stage, in order; a stage lasts from the previous mark.
SPARK_STAGE_MARKS = (
    ("read", "read "),
    ("dedup", "events: "),
    ("raw_checks", "validated raw_events"),
    ("quarantine", "quarantined "),
    ("transform_write_checks", "wrote "),
)
SPARK_LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) \w+ (?:extract_features|pipeline\.validation): (.*)$")
SPARK_JOB_TIME = re.compile(r"^wrote \S+ in ([\d.]+)s")


@dataclasses.dataclass(frozen=True)
class ProcessMeasurement:
    """One finished process: wall time, peak RSS and CPU time of its whole tree, exit code and output."""

    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    returncode: int
    stdout: str
    stderr: str


def address_space(pid: int) -> tuple[int, ...] | int:
    """A key equal for processes that share one address space; the pid where /proc cannot tell.

    The JVM starts helpers (Hadoop's ``chmod`` for every directory it creates, without the
    native library) by ``posix_spawn``: until the ``exec``, the child runs in the JVM's own
    memory and reports the JVM's whole RSS as its own. Summed naively, a tree sample taken
    then counts the JVM twice (a 9.6 GB "peak" seen for a 4.7 GB JVM at 10M events).

    The key is the memory map's layout from ``/proc/<pid>/stat``: virtual size, start and end
    of the code, start of the stack (fields 23, 26, 27, 28). Two separate processes differ in
    it (address-space randomisation); a child in its parent's memory does not, nor does a
    fresh ``fork`` copy until its map changes (its pages are the parent's until written).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return pid
    # fields[0] is field 3 (state): field n is fields[n - 3].
    return int(fields[20]), int(fields[23]), int(fields[24]), int(fields[25])


class _TreeSampler(threading.Thread):
    """Samples the summed RSS and CPU time of a process and all its descendants until stopped.

    Each address space is counted once (:func:`address_space`).

    CPU time (user + system, summed over every process seen) is steadier than wall time on a
    shared machine: waiting for a core counts in the one, not the other. It misses at most
    the last ``POLL_SECONDS`` of each process.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_bytes = pid, 0
        self.cpu_by_pid: dict[int, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            rss: dict[tuple[int, ...] | int, int] = {}
            for proc in tree:
                try:
                    with proc.oneshot():
                        rss[address_space(proc.pid)] = proc.memory_info().rss
                        cpu = proc.cpu_times()
                    self.cpu_by_pid[proc.pid] = cpu.user + cpu.system
                except psutil.Error:  # exited between listing and sampling
                    pass
            self.peak_bytes = max(self.peak_bytes, sum(rss.values()))
            self._stop_event.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure_process(command: Sequence[str], log_stem: Path, cwd: Path, timeout_s: float = RUN_TIMEOUT_SECONDS) -> ProcessMeasurement:
    """Run ``command``; time it and sample its tree's RSS and CPU every ``POLL_SECONDS``.

    A run over ``timeout_s`` is killed (its own process group only).

    Args:
        command: The program and its arguments.
        log_stem: Output goes to ``<log_stem>.out`` / ``.err`` (kept for inspection).
        cwd: Working directory of the process.
        timeout_s: Longest run (``RUN_TIMEOUT_SECONDS`` unless given).

    Returns:
        The measurement, with the process's output.
    """
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with out_path.open("w") as out, err_path.open("w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(command), cwd=cwd, stdout=out, stderr=err, start_new_session=True)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        wall_s = time.perf_counter() - started
        sampler.stop()
    return ProcessMeasurement(round(wall_s, 3), round(sampler.peak_bytes / 2**20, 1), round(sum(sampler.cpu_by_pid.values()), 1),
                              returncode, out_path.read_text(), err_path.read_text())


def parse_spark_log(stderr: str, wall_s: float) -> tuple[float | None, dict[str, float]]:
    """The job's own time (``wrote ... in X.Xs``) and stage durations from its log timestamps.

    Stages run from one job log line to the next (see ``SPARK_STAGE_MARKS``), starting when
    ``run()`` starts; ``startup_shutdown`` is the rest of the wall time (interpreter, JVM,
    session, ``spark.stop()``).

    Args:
        stderr: The Spark job's log.
        wall_s: Wall time of the whole process.

    Returns:
        The job time and the stage durations, or ``(None, {})`` when the log lacks the
        job's final line.
    """
    marks: dict[str, float] = {}
    job_s = None
    for line in stderr.splitlines():
        match = SPARK_LOG_LINE.match(line)
        if not match:
            continue
        at = dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = match[2]
        for stage, prefix in SPARK_STAGE_MARKS:
            if message.startswith(prefix):
                marks.setdefault(stage, at)
        if found := SPARK_JOB_TIME.match(message):
            job_s = float(found[1])
    if job_s is None or "transform_write_checks" not in marks:
        return None, {}
    stages = {"startup_shutdown": round(wall_s - job_s, 2)}
    previous = marks["transform_write_checks"] - job_s
    for stage, _ in SPARK_STAGE_MARKS:
        if stage in marks:
            stages[stage] = round(marks[stage] - previous, 2)
            previous = marks[stage]
    return job_s, stages
