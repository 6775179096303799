"""The run report on hand-made inputs: files, decision, numbers, escaping, atomic rewrite."""

import html
import json
import re
import tomllib
from pathlib import Path

import pytest

from pipeline import report
from pipeline.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN = {"ds": "2024-05-01", "run_id": "scheduled__2024-05-01", "run_key": "rk-1", "config_hash": "abc123", "teacher_version": 7}
COSTS = {"trainable_params": 1_200_000, "saved_model_bytes": 48_000_000, "latency_ms_p50": 8.0, "latency_ms_p99": 20.0,
         "throughput_users_per_s": 12_000.0, "batch_size": 256}
MODELS = {
    "teacher": {"ndcg@10": 0.2103, "recall@20": 0.31, "recall@10": 0.22, "ndcg@20": 0.25, "hitrate@10": 0.6, "mrr": 0.3,
                "coverage@10": 0.4, "users": 900, **COSTS},
    # Student: a tenth of the params and a quarter of the latency; its p99 was not measured.
    "student_kd": {"ndcg@10": 0.2051, "recall@20": 0.30, "users": 900, "trainable_params": 120_000,
                   "saved_model_bytes": 6_000_000, "latency_ms_p50": 2.0, "latency_ms_p99": None,
                   "throughput_users_per_s": 48_000.0, "batch_size": 256},
    "most_popular": {"ndcg@10": 0.1012, "recall@20": 0.15, "users": 900},
    "als": {"ndcg@10": 0.1507, "users": 900},
}
EVALUATION = {"split": "test", "users": 900, "models": MODELS}
HISTORIES = {
    "teacher": [{"epoch": e, "loss": 5.0 / e, "val_score": 0.1 + 0.03 * e, "seconds": 3.1} for e in (1, 2, 3)],
    "student_kd": [{"epoch": e, "loss": 4.0 / e, "hard_loss": 2.0 / e, "soft_loss": 1.5 / e, "hint_loss": 0.05 / e,
                    "val_score": 0.09 + 0.03 * e, "seconds": 1.2} for e in (1, 2, 3)],
}


def _check(name, metric, value, reference, passed, reason):
    return {"name": name, "metric": metric, "value": value, "reference": reference,
            "change": value / reference - 1, "threshold": -0.03, "passed": passed, "reason": reason}


BLESSED_GATE = {
    "decision": "BLESSED", "blessed": True, "reasons": [],
    "warnings": ["no champion yet: champion checks skipped (first run)"],
    "checks": [_check("student_vs_teacher", "ndcg@10", 0.2051, 0.2103, True, "ndcg@10: student 0.2051 vs teacher 0.2103")],
}
REJECTED_GATE = {
    "decision": "NOT_BLESSED", "blessed": False,
    "reasons": ["ndcg@10: student 0.1900 vs teacher 0.2103: change -9.65% < allowed -3.00% (relative)",
                "recall@20: <script>alert(1)</script> & friends"],
    "warnings": [],
    "checks": [_check("student_vs_teacher", "ndcg@10", 0.19, 0.2103, False, "ndcg@10 failed"),
               _check("student_vs_teacher", "recall@20", 0.25, 0.31, False, "recall@20 failed")],
}


@pytest.fixture(params=["blessed", "rejected"])
def case(request):
    if request.param == "blessed":
        return BLESSED_GATE, {"version": 3, "registry": "/data/registry", "champion": 3}
    return REJECTED_GATE, None


def test_writes_every_file_with_the_decision_reasons_and_metrics(tmp_path, case):
    gate, promotion = case
    out = write_report(tmp_path / "report", RUN, EVALUATION, gate, HISTORIES, promotion)

    assert out == {"html": str(tmp_path / "report" / "report.html"), "markdown": str(tmp_path / "report" / "report.md"),
                   "dir": str(tmp_path / "report")}
    page, markdown = open(out["html"], encoding="utf-8").read(), open(out["markdown"], encoding="utf-8").read()
    assert f"Distillation report 2024-05-01: {gate['decision']}" in page
    for text in (page, markdown):
        assert gate["decision"] in text
        for name, metrics in MODELS.items():
            assert name in text and f"{metrics['ndcg@10']:.4f}" in text
    for reason in gate["reasons"]:
        assert html.escape(reason) in page and reason.replace("<s", "\\<s").replace("</", "\\</") in markdown
    for warning in gate["warnings"]:
        assert warning in page and warning in markdown
    assert '<img src="training_curves.png"' in page and '<img src="quality_vs_cost.png"' in page
    assert ("version 3 in /data/registry" in page) == (promotion is not None)
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["gate"]["decision"] == gate["decision"]


def test_figures_are_real_pngs(tmp_path):
    write_report(tmp_path / "report", RUN, EVALUATION, BLESSED_GATE, HISTORIES, None)
    for name in ("training_curves.png", "quality_vs_cost.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


def test_quality_vs_cost_plots_every_cost_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: figures.append((Path(path).name, fig)))
    models = {**MODELS, "teacher": {**MODELS["teacher"], "index_bytes": 8_000_000},
              "student_kd": {**MODELS["student_kd"], "index_bytes": 1_000_000}}
    write_report(tmp_path / "report", RUN, {**EVALUATION, "models": models}, BLESSED_GATE, HISTORIES, None)
    fig = dict(figures)["quality_vs_cost.png"]
    axes = {ax.get_xlabel(): ax for ax in fig.axes}
    assert [label.split(",")[0] for label in axes] == [label for _, label in report.COST_AXES]

    def points(label: str) -> set[tuple[float, float]]:
        return {tuple(xy) for c in axes[f"{label}, log scale"].collections for xy in c.get_offsets().tolist()}

    # Each panel places teacher and student at their own cost of that kind and their NDCG@10.
    assert points("serving index MB (lower: cheaper)") == {(8.0, 0.2103), (1.0, 0.2051)}
    assert points("users/s served (higher: cheaper)") == {(12_000.0, 0.2103), (48_000.0, 0.2051)}
    assert points("trainable parameters") == {(1_200_000, 0.2103), (120_000, 0.2051)}


def test_reasons_are_html_escaped(tmp_path):
    out = write_report(tmp_path / "report", RUN, EVALUATION, REJECTED_GATE, HISTORIES, None)
    page = open(out["html"], encoding="utf-8").read()
    assert "<script>" not in page
    assert "recall@20: &lt;script&gt;alert(1)&lt;/script&gt; &amp; friends" in page
    # Markdown: "<" that could open a tag is backslash-escaped; "change ... < allowed" stays readable.
    markdown = open(out["markdown"], encoding="utf-8").read()
    assert "recall@20: \\<script>alert(1)\\</script> & friends" in markdown and "% < allowed" in markdown


def test_script_in_any_field_is_escaped(tmp_path):
    script = "<script>alert(1)</script>"
    run = {**RUN, "run_id": f"run {script}"}
    check = {**REJECTED_GATE["checks"][0], "metric": f"ndcg {script}", "reason": f"reason {script}"}
    gate = {**REJECTED_GATE, "checks": [check], "warnings": [f"warning {script}"]}
    evaluation = {**EVALUATION, "models": {**MODELS, f"model {script}": {"ndcg@10": 0.1}}}
    out = write_report(tmp_path / "report", run, evaluation, gate, HISTORIES, None,
                       tensorboard={"teacher": f"/logs/{script}"})

    page = open(out["html"], encoding="utf-8").read()
    assert "<script" not in page.lower()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for text in ("run ", "ndcg ", "reason ", "warning ", "model ", "/logs/"):
        assert f"{text}{escaped}" in page, text
    markdown = open(out["markdown"], encoding="utf-8").read()
    assert not re.search(r"(?<!\\)</?script", markdown)  # every "<" that opens a tag is backslash-escaped
    assert "run \\<script>alert(1)\\</script>" in markdown and "| ndcg \\<script>alert(1)\\</script> |" in markdown


def test_training_logs_list_each_models_tensorboard_directory_and_the_command(tmp_path):
    logs = {"teacher": "/data/models/teacher/v7/logs", "student_kd": "/data/models/student/rk-1/logs"}
    out = write_report(tmp_path / "report", RUN, EVALUATION, BLESSED_GATE, HISTORIES, None, tensorboard=logs)

    page = open(out["html"], encoding="utf-8").read()
    assert "<h2>Training logs</h2>" in page and "<code>make tensorboard</code>" in page
    for name, logdir in logs.items():
        assert f"<tr><td>{name}</td><td>{logdir}</td></tr>" in page
    assert "href" not in page  # the directories are on the run's machine: text, not links
    markdown = open(out["markdown"], encoding="utf-8").read()
    assert "## Training logs" in markdown and "`make tensorboard`" in markdown
    assert "| teacher | /data/models/teacher/v7/logs |" in markdown
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["tensorboard"] == logs


def test_no_training_logs_section_without_tensorboard_directories(tmp_path):
    out = write_report(tmp_path / "report", RUN, EVALUATION, BLESSED_GATE, HISTORIES, None)
    for path in (out["html"], out["markdown"]):
        text = open(path, encoding="utf-8").read()
        assert "Training logs" not in text and "make tensorboard" not in text


def test_the_templates_ship_in_the_package():
    """A non-editable install (the Docker image) has only the files package-data names."""
    repo = Path(report.__file__).resolve().parents[1]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipeline"]
    templates = {p.relative_to(repo / "pipeline") for p in (repo / "pipeline" / "templates").iterdir() if p.is_file()}
    assert {"report.html", "report.md"} <= {p.name for p in templates}
    assert {p for p in templates if not any(p.match(g) for g in globs)} == set()


def test_cost_table_shows_values_ratios_and_dashes_for_missing(tmp_path):
    out = write_report(tmp_path / "report", RUN, EVALUATION, BLESSED_GATE, HISTORIES, None)
    page = open(out["html"], encoding="utf-8").read()
    # student p99 is None -> "–"; sizes: 48e6 B = 48.00 MB, 6e6 B = 6.00 MB.
    assert "<td class=n>48.00</td>" in page and "<td class=n>6.00</td>" in page
    assert "<td>student_kd</td><td class=n>120,000</td><td class=n>6.00</td><td class=n>2.00</td><td class=n>–</td>" in page
    # Ratios to the teacher: params 120k / 1.2M = 0.1, latency 2 / 8 = 0.25, throughput 48k / 12k = 4.
    assert "<td>student_kd ÷ teacher</td><td class=n>0.1×</td><td class=n>0.125×</td><td class=n>0.25×</td>" in page
    assert "<td class=n>4×</td>" in page
    # Baselines have no costs: they are not in the cost table, and their missing metrics render "–".
    assert "<td>als</td><td class=n>0.1507</td><td class=n>–</td>" in page


def test_rewrite_replaces_the_directory_atomically(tmp_path):
    write_report(tmp_path / "report", RUN, EVALUATION, BLESSED_GATE, HISTORIES, None)
    (tmp_path / "report" / "stale.txt").write_text("from an earlier attempt")
    out = write_report(tmp_path / "report", RUN, EVALUATION, REJECTED_GATE, HISTORIES, None)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no .tmp-/.old- siblings left
    assert not (tmp_path / "report" / "stale.txt").exists()
    assert "NOT_BLESSED" in open(out["html"], encoding="utf-8").read()


def test_a_failure_while_writing_leaves_the_old_report(tmp_path, monkeypatch):
    write_report(tmp_path / "report", RUN, EVALUATION, BLESSED_GATE, HISTORIES, None)

    def broken_plot(*args):
        raise OSError("disk full")

    monkeypatch.setattr(report, "_plot_quality_vs_cost", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path / "report", RUN, EVALUATION, REJECTED_GATE, HISTORIES, None)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert "NOT_BLESSED" not in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")


def test_empty_histories_and_no_costs_still_give_figures(tmp_path):
    evaluation = {"split": "test", "users": 900, "models": {"most_popular": MODELS["most_popular"]}}
    write_report(tmp_path / "report", RUN, evaluation, REJECTED_GATE, {"teacher": []}, None)
    for name in ("training_curves.png", "quality_vs_cost.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_MAGIC


def test_headline_says_a_rerun_left_the_champion_alone():
    rerun = {"version": 2, "registry": "/data/registry", "champion": 1, "rerun": True}
    assert report._headline(BLESSED_GATE, rerun).endswith(
        "; a re-run: version 2 was published before, the champion stays version 1")
    assert report._headline(BLESSED_GATE, {**rerun, "rerun": False}).endswith("; promoted as version 2")


def test_run_note_has_the_decision_metrics_failed_checks_and_report_link():
    models = {**MODELS, "champion": {"ndcg@10": 0.2200}}
    note = report.run_note(BLESSED_GATE, {"models": models}, {"version": 3, "champion": 3, "rerun": False}, "/recsys/runs/d/r/report")
    # 0.2051 / 0.2103 - 1 = -2.47%; 0.2051 / 0.2200 - 1 = -6.77%
    assert note == ("**BLESSED** ([Run report](/recsys/runs/d/r/report)): the student passed all 1 gate checks; promoted as version 3. "
                    "NDCG@10 student 0.2051, teacher 0.2103 (-2.5%), champion 0.2200 (-6.8%).")
    rejected = report.run_note(REJECTED_GATE, {"models": MODELS}, None)
    assert rejected == ("**NOT_BLESSED**: 2 of 2 gate checks failed; the serving champion is unchanged. "
                        "NDCG@10 student 0.2051, teacher 0.2103 (-2.5%). Failed: ndcg@10 failed; recall@20 failed.")
    # Many long reasons: the note stays within the UI's 1,000 characters and keeps its link.
    long_gate = {**REJECTED_GATE, "checks": [{**REJECTED_GATE["checks"][0], "reason": "x" * 400}] * 5}
    long_note = report.run_note(long_gate, {"models": {}}, None, "/link")
    assert len(long_note) == 1000 and long_note.startswith("**NOT_BLESSED** ([Run report](/link)): 5 of 5 gate checks failed")
    assert "NDCG@10 student n/a." in long_note and long_note.endswith("...")
