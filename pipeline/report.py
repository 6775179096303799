"""The run report: one directory a person opens to see what the nightly run did and why.

:func:`write_report` turns the run's lineage, test metrics, gate decision, training
histories and promotion into ``report.html`` and ``report.md`` (the same tables, built
once, rendered by the Jinja2 templates in ``pipeline/templates/``, the HTML one autoescaped),
two figures and ``summary.json`` (the inputs, for machines). The directory is published
atomically, so a reader never sees half a report.

matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from pipeline.io import atomic_dir, write_json
from pipeline.trend import TREND_HEADERS, TREND_PNG, plot_trend, trend_rows

log = logging.getLogger(__name__)

MISSING = "–"
CURVES_PNG = "training_curves.png"
COST_PNG = "quality_vs_cost.png"
# (key, header, format spec) in reading order; counts use ",.0f" so floats and ints both format.
QUALITY_COLUMNS = (("ndcg@10", "NDCG@10", ".4f"), ("recall@10", "Recall@10", ".4f"), ("ndcg@20", "NDCG@20", ".4f"),
                   ("recall@20", "Recall@20", ".4f"), ("hitrate@10", "HitRate@10", ".4f"), ("mrr", "MRR", ".4f"),
                   ("coverage@10", "Coverage@10", ".4f"), ("users", "users", ",.0f"))
COST_COLUMNS = (("trainable_params", "params", ",.0f"), ("saved_model_mb", "SavedModel MB", ".2f"),
                ("latency_ms_p50", "p50 ms", ".2f"), ("latency_ms_p99", "p99 ms", ".2f"),
                ("throughput_users_per_s", "users/s", ",.0f"), ("index_mb", "index MB", ".2f"),
                ("recall_at_100", "recall@100 vs exact", ".3f"), ("batch_size", "batch", ",.0f"))
COST_KEYS = ("trainable_params", "saved_model_bytes", "latency_ms_p50", "latency_ms_p99", "throughput_users_per_s")
# The quality-vs-cost plot's panels: (cost key of :func:`_costs`, x-axis label).
COST_AXES = (("throughput_users_per_s", "users/s served (higher: cheaper)"),
             ("index_mb", "serving index MB (lower: cheaper)"), ("trainable_params", "trainable parameters"))
LADDER_COLUMNS = ("rung", "budget", "NDCG@10", "Recall@20", "params", "users/s", "gate", "why not")
_NUMERIC_CELL = re.compile(r"^([+-]?[\d,.]+[×%]?|–|nan|inf|-inf)$")  # right-aligned in HTML tables
TENSORBOARD_COMMAND = "make tensorboard"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _as_float(row: dict, key: str) -> float:
    return float(row[key]) if _is_number(row.get(key)) else math.nan


def _fmt(value, spec: str) -> str:
    """``value`` formatted, or "–" when it is missing or not a number (NaN stays visible as "nan")."""
    return format(value, spec) if _is_number(value) else MISSING


def _costs(metrics: dict) -> dict:
    """The cost keys of one model, with the SavedModel size in MB (10^6 bytes)."""
    size, index = metrics.get("saved_model_bytes"), metrics.get("index_bytes")
    return {**metrics, "saved_model_mb": size / 1e6 if _is_number(size) else None,
            "index_mb": index / 1e6 if _is_number(index) else None}


def _ratio_row(name: str, student: dict, teacher: dict) -> list[str]:
    """``student / teacher`` for every cost column but the batch size (whose ratio means nothing)."""
    cells = []
    for key, _, _ in COST_COLUMNS[:-2]:  # not recall@100 nor the batch size
        ratio = student[key] / teacher[key] if _finite(student.get(key)) and _finite(teacher.get(key)) and teacher[key] else None
        cells.append(MISSING if ratio is None else f"{ratio:.3g}×")
    return [f"{name} ÷ teacher"] + cells + [MISSING, MISSING]


def _tables(evaluation: dict, gate: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The quality, cost and gate tables as (title, headers, rows of strings), shared by HTML and Markdown."""
    models = evaluation.get("models", {})
    quality = [[name] + [_fmt(m.get(key), spec) for key, _, spec in QUALITY_COLUMNS] for name, m in models.items()]
    exported = {name: _costs(m) for name, m in models.items() if any(m.get(k) is not None for k in COST_KEYS)}
    cost = [[name] + [_fmt(m.get(key), spec) for key, _, spec in COST_COLUMNS] for name, m in exported.items()]
    if "teacher" in exported:
        cost += [_ratio_row(name, m, exported["teacher"]) for name, m in exported.items() if name.startswith("student")]
    checks = [[c.get("name", ""), c.get("metric", ""), _fmt(c.get("value"), ".4f"), _fmt(c.get("reference"), ".4f"),
               _fmt(c.get("change"), "+.4f"), _fmt(c.get("threshold"), "+.4f"), "pass" if c.get("passed") else "FAIL",
               c.get("reason", "")] for c in gate.get("checks", [])]
    split = f"{evaluation.get('split', '?')} split, {_fmt(evaluation.get('users'), ',.0f')} users"
    ladder = [[rung["name"] + (" (promoted)" if rung["name"] == gate.get("student_model") and gate.get("blessed") else ""),
               _fmt(rung.get("share"), ".0%"), _fmt(models.get(rung["name"], {}).get("ndcg@10"), ".4f"),
               _fmt(models.get(rung["name"], {}).get("recall@20"), ".4f"), _fmt(rung.get("trainable_params"), ",.0f"),
               _fmt(rung.get("users_per_s"), ",.0f"), str(rung.get("decision")), "; ".join(rung.get("reasons") or [])]
              for rung in gate.get("ladder") or []]
    return [(f"Ranking quality ({split})", ["model"] + [h for _, h, _ in QUALITY_COLUMNS], quality),
            ("Serving cost", ["model"] + [h for _, h, _ in COST_COLUMNS], cost),
            *([("Student ladder (cheapest passing rung promoted)", list(LADDER_COLUMNS), ladder)] if len(ladder) > 1 else []),
            ("Gate checks", ["check", "metric", "value", "reference", "change", "threshold", "result", "reason"], checks)]


def _lineage_table(run: dict, promotion: dict | None) -> tuple[str, list[str], list[list[str]]]:
    rows = [[str(key), str(value)] for key, value in run.items()]
    if promotion and promotion.get("promoted", True):
        shown = f"version {promotion.get('version')} in {promotion.get('registry')} (champion: {promotion.get('champion')})"
    else:
        shown = f"not promoted: {promotion.get('reason')}" if promotion else "not promoted"
    rows.append(["promotion", shown])
    return "Run and lineage", ["key", "value"], rows


def _headline(gate: dict, promotion: dict | None) -> str:
    checks = gate.get("checks", [])
    if not gate.get("blessed"):
        failed = sum(not c.get("passed") for c in checks)
        return f"{failed} of {len(checks)} gate checks failed; the serving champion is unchanged"
    promoted = f"; promoted as version {promotion.get('version')}" if promotion else ""
    if promotion and not promotion.get("promoted", True):
        promoted = f"; NOT PROMOTED: {promotion.get('reason')}"
    elif promotion and promotion.get("rerun"):
        promoted = (f"; a re-run: version {promotion.get('version')} was published before, "
                    f"the champion stays version {promotion.get('champion')}")
    why = f" ({gate['why']})" if gate.get("why") and len(gate.get("ladder") or []) > 1 else ""
    return f"the student passed all {len(checks)} gate checks{promoted}{why}"


def run_note(gate: dict, evaluation: dict, promotion: dict | None, report_link: str | None = None) -> str:
    """The run's note for the orchestrator's UI (Markdown, under 1,000 characters): the gate's
    decision, the headline, NDCG@10 of student, teacher and champion, and the report's link.

    The link comes first: the UI shows a long note cut to one line.

    Example: ``**BLESSED** ([Run report](/recsys/...)): the student passed all 4 gate checks;
    promoted as version 2. NDCG@10 student 0.1547, teacher 0.1588 (-2.6%), champion 0.1502 (+3.0%).``
    """
    models = evaluation.get("models", {})
    student = models.get(gate.get("student_model", "student_kd"), {}).get("ndcg@10")

    def against(name: str) -> str | None:
        value = models.get(name, {}).get("ndcg@10")
        if not _finite(value):
            return None
        change = f" ({student / value - 1:+.1%})" if _finite(student) and value > 0 else ""
        return f"{name} {value:.4f}{change}"

    parts = [f"student {student:.4f}" if _finite(student) else "student n/a"] + list(filter(None, map(against, ("teacher", "champion"))))
    link = f" ([Run report]({report_link}))" if report_link else ""
    note = f"**{gate.get('decision')}**{link}: {_md_text(_headline(gate, promotion))}. NDCG@10 {', '.join(parts)}."
    failed = [c.get("reason", "") for c in gate.get("checks", []) if not c.get("passed")]
    if failed:
        note += " Failed: " + "; ".join(_md_text(reason) for reason in failed[:3]) + ("; ..." if len(failed) > 3 else "") + "."
    return note if len(note) <= 1000 else note[:997] + "..."


def _md_text(text) -> str:
    """``text`` safe in Markdown: "<" that could open raw HTML is backslash-escaped (renders as "<")."""
    return re.sub(r"<(?=[A-Za-z/!?])", r"\\<", str(text))


def _md_cell(text) -> str:
    """``text`` safe in one Markdown table cell: escaped as by :func:`_md_text`, "|" escaped, one line."""
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


@functools.cache
def _templates() -> Environment:
    """The report's templates (``pipeline/templates/``): ``.html`` autoescaped, a missing value an error."""
    env = Environment(loader=PackageLoader("pipeline", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(md=_md_text, md_cell=_md_cell)
    env.tests["numeric"] = lambda cell: bool(_NUMERIC_CELL.match(cell))
    return env


def _render(template: str, context: dict) -> str:
    return _templates().get_template(template).render(context)


def _plot_training_curves(path: Path, histories: dict[str, list[dict]], colors: dict[str, str]) -> None:
    """Validation score of every model (left) and each model's loss terms (right, one panel per model)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [name for name, rows in histories.items() if rows]
    fig = Figure(figsize=(11, 0.6 + 2.6 * max(len(names), 1)), layout="constrained")
    if not names:
        fig.text(0.5, 0.5, "no training history", ha="center", va="center", fontsize=14)
    else:
        axes = fig.subplot_mosaic([["__val__", name] for name in names])
        for name in names:
            rows = histories[name]
            epochs = [row.get("epoch", i + 1) for i, row in enumerate(rows)]
            axes["__val__"].plot(epochs, [_as_float(r, "val_score") for r in rows], marker="o", color=colors[name], label=name)
            terms = sorted({k for r in rows for k in r if k.endswith("loss")}, key=lambda k: (k != "loss", k))
            for term in terms:
                axes[name].plot(epochs, [_as_float(r, term) for r in rows], marker=".", label=term)
            values = [_as_float(r, t) for r in rows for t in terms if _finite(r.get(t))]
            if values and min(values) > 0 and max(values) > 10 * min(values):
                axes[name].set_yscale("log")  # terms differ by orders of magnitude (hint vs T²-scaled soft loss)
            axes[name].set_title(f"{name}: loss terms", fontsize=10)
            axes[name].legend(fontsize=8)
        axes["__val__"].set_title("validation score per epoch", fontsize=10)
        axes["__val__"].legend(fontsize=8)
        for ax in axes.values():
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch", fontsize=9)
            ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _short_number(x: float, _position=None) -> str:
    """Tick labels a person reads at a glance: 3, 20, 300k, 3M (not 3x10^5)."""
    return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x >= 1e4 else f"{x:g}"


def _plot_quality_vs_cost(path: Path, models: dict[str, dict], colors: dict[str, str], promoted: str | None = None) -> None:
    """NDCG@10 against serving throughput, serving index size and trainable parameters (log x, one
    panel each: :data:`COST_AXES`); models without that cost as horizontal lines; the promoted rung ringed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, len(COST_AXES), sharey=True)
    scored = {name: _costs(m) for name, m in models.items() if _finite(m.get("ndcg@10"))}
    for ax, (key, label) in zip(axes, COST_AXES):
        points = {name: m for name, m in scored.items() if _finite(m.get(key)) and m[key] > 0}
        for name, m in scored.items():
            if name in points:  # a legend, not text labels: models often share a cost (student and champion)
                ax.scatter(m[key], m["ndcg@10"], s=70, color=colors[name], edgecolor="white", zorder=3, label=name)
                if name == promoted:
                    ax.scatter(m[key], m["ndcg@10"], s=260, facecolor="none", edgecolor="black", linewidth=1.5, zorder=4,
                               label="promoted")
            else:
                ax.axhline(m["ndcg@10"], color=colors[name], linestyle="--", linewidth=1.2, label=f"{name} (no cost)")
        if points:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(_short_number))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.margins(x=0.2, y=0.15)
        else:
            ax.text(0.5, 0.5, f"no model has {key}", transform=ax.transAxes, ha="center")
        ax.set_xlabel(f"{label}, log scale")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("NDCG@10 (test)")
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize=9)
    fig.suptitle("quality vs serving cost")
    fig.savefig(path, dpi=100)


def write_report(out_dir: str | Path, run: dict, evaluation: dict, gate: dict,
                 histories: dict[str, list[dict]], promotion: dict | None,
                 tensorboard: Mapping[str, str] | None = None, trend: Sequence[Mapping] | None = None) -> dict:
    """Write the run's report directory atomically (replacing any earlier one).

    Args:
        out_dir: The report directory, e.g. ``<data>/reports/ds=<ds>/<run_key>``.
        run: Lineage: ``ds``, ``run_id``, ``run_key``, ``config_hash``, ``teacher_version``, ...
        evaluation: ``{"split", "users", "models": {name: metrics and, for exported models, costs}}``.
        gate: ``GateResult.to_dict()``.
        histories: Per-epoch training rows by model; keys ending in "loss" are loss terms.
        promotion: ``{"version", "registry", "champion"}``, or None when the student was not promoted.
        tensorboard: Each model's TensorBoard log directory by model name; when given, the report
            lists them with the command that serves them (as text: the reader's machine may differ).
        trend: The registry's run records (this run's included), for the last nights' table and plot.

    Returns:
        ``{"html", "markdown", "dir"}``: paths in the published directory.
    """
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    models = evaluation.get("models", {})
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys([*models, *histories]))}
    title = f"Distillation report {run.get('ds', '?')}: {gate.get('decision', '?')}"
    context = {"title": title, "decision": str(gate.get("decision")), "blessed": bool(gate.get("blessed")),
               "headline": _headline(gate, promotion), "reasons": [str(r) for r in gate.get("reasons", [])],
               "warnings": [str(w) for w in gate.get("warnings", [])], "tables": _tables(evaluation, gate),
               "lineage": _lineage_table(run, promotion), "curves_png": CURVES_PNG, "cost_png": COST_PNG,
               "tensorboard": [[str(name), str(logdir)] for name, logdir in (tensorboard or {}).items()],
               "tensorboard_command": TENSORBOARD_COMMAND, "trend_headers": TREND_HEADERS, "trend_png": TREND_PNG,
               "trend": trend_rows(trend or [])}
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.html").write_text(_render("report.html", context), encoding="utf-8")
        (tmp / "report.md").write_text(_render("report.md", context), encoding="utf-8")
        _plot_training_curves(tmp / CURVES_PNG, histories, colors)
        _plot_quality_vs_cost(tmp / COST_PNG, models, colors, gate.get("student_model") if gate.get("blessed") else None)
        if len(context["trend"]) > 1:
            plot_trend(tmp / TREND_PNG, trend or [])
        write_json(tmp / "summary.json", {"run": run, "evaluation": evaluation, "gate": gate,
                                          "histories": histories, "promotion": promotion,
                                          "tensorboard": dict(tensorboard) if tensorboard else None})
    log.info("report: %s %s, %d models, written to %s", run.get("ds"), gate.get("decision"), len(models), out_dir)
    return {"html": str(out_dir / "report.html"), "markdown": str(out_dir / "report.md"), "dir": str(out_dir)}
