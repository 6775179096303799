"""Per-task durations of the latest ``recsys_distillation`` run, from the Airflow metadata DB.

Called by ``bench/time_demo.sh`` after ``airflow dags test``; prints a table, and writes the
timings as JSON only where ``--out`` says (``make demo DEMO_TIMING=bench/results/demo_timing.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def latest_run(dag_id: str = "recsys_distillation") -> tuple[str, str, list[dict]]:
    """``(run_id, state, tasks)`` of the DAG's newest run; tasks in start order, each
    ``{"task", "state", "seconds", "start"}``."""
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.start_date.desc()).first()
        tasks = session.query(TaskInstance).filter(TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id).all()
        rows = sorted(({"task": t.task_id, "state": str(t.state), "seconds": round(t.duration or 0.0, 1),
                        "start": t.start_date.isoformat() if t.start_date else None} for t in tasks),
                      key=lambda r: r["start"] or "~")
        return run.run_id, str(run.state), rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ds", required=True)
    parser.add_argument("--wall", type=float, required=True, help="wall seconds of `airflow dags test`")
    parser.add_argument("--out", type=Path, help="JSON file to write the timings to (default: print only)")
    args = parser.parse_args(argv)
    run_id, run_state, rows = latest_run()
    pipeline_seconds = round(sum(r["seconds"] for r in rows), 1)
    payload = {"ds": args.ds, "run_id": run_id, "state": run_state, "airflow_dags_test_wall_seconds": round(args.wall, 1),
               "sum_of_task_seconds": pipeline_seconds, "cpus": os.cpu_count(), "tasks": rows}
    print(f"\n{'task':22}{'state':10}{'seconds':>9}")
    for row in rows:
        print(f"{row['task']:22}{row['state'].split('.')[-1]:10}{row['seconds']:9.1f}")
    print(f"{'sum of tasks':32}{pipeline_seconds:9.1f}\n{'airflow dags test wall':32}{args.wall:9.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"timings written to {args.out}")
    finished = {row["task"]: row["state"].split(".")[-1] for row in rows}
    if not finished or any(state not in ("success", "skipped") for state in finished.values()):
        print(f"the run did not complete: {finished or 'no task ran'}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
