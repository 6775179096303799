"""Great Expectations suites for the raw event window and the extracted features.

A suite that fails raises :class:`DataValidationError`, whose message names each failed
expectation, its column, how many rows broke it and a few examples; GX's HTML Data Docs
are written to the given directory either way, so a failed night can be inspected.
Works on Spark and pandas DataFrames alike (GX picks the engine from the frame).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.config import FeatureConfig
from pipeline.data.contract import BLANK_ID_FLAGS, EVENT_ID_COPIES, EVENT_SCHEMA, EVENT_TYPES, ID_COLUMNS, MIN_VALUE, window_bounds
from pipeline.data.features import SPLITS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

log = logging.getLogger(__name__)

PAIR_KEY, PAIR_BASE = "pair_key", 1 << 32  # the interactions' (user_idx, item_idx) as one long


@dataclasses.dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation, with the numbers a person needs to act on it."""

    suite: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    element_count: int | None
    examples: list[Any]
    observed_value: Any

    def describe(self) -> str:
        """One readable line, e.g. ``raw_events: expect_column_values_to_not_be_null(user_id): 3 of 10 rows...``."""
        target = f"({self.column})" if self.column else ""
        if self.unexpected_count is not None:
            share = f" ({self.unexpected_count / self.element_count:.2%})" if self.element_count else ""
            found = f"{self.unexpected_count} of {self.element_count} rows unexpected{share}, e.g. {self.examples}"
        else:
            found = f"observed {self.observed_value!r}"
        return f"{self.suite}: {self.expectation}{target}: {found}"


class DataValidationError(RuntimeError):
    """A Great Expectations suite failed."""

    def __init__(self, failures: Sequence[ExpectationFailure], docs_dir: str | Path | None):
        self.failures = list(failures)
        self.docs_dir = str(docs_dir) if docs_dir else None
        lines = [f"data validation failed ({len(self.failures)} expectation(s)):"]
        lines += [f"  - {failure.describe()}" for failure in self.failures]
        if self.docs_dir:
            lines.append(f"  Data Docs: {self.docs_dir}/index.html")
        super().__init__("\n".join(lines))


def raw_events_suite(window_start: dt.date, window_end: dt.date, cfg: FeatureConfig) -> list:
    """Expectations on the deduplicated raw event window: the row rules of
    :mod:`pipeline.data.contract`, as GX expectations. The frame carries, besides the
    contract's columns, ``event_id_copies``: how many distinct events share each row's
    ``event_id``, and ``<id>_is_blank`` for each id column (:data:`~pipeline.data.contract.BLANK_ID_FLAGS`).

    Row-level expectations tolerate up to ``cfg.max_quarantine_share`` bad rows (``mostly``):
    those rows are quarantined by the feature job; more than that fails the night.

    Args:
        window_start: First day of the window (inclusive).
        window_end: Last day of the window (inclusive).
        cfg: Feature settings (quarantine limit, minimum row count).

    Returns:
        GX expectation objects.
    """
    import great_expectations as gx

    e = gx.expectations
    mostly = 1.0 - cfg.max_quarantine_share
    start, end = window_bounds(window_start, window_end)
    return [
        e.ExpectTableRowCountToBeBetween(min_value=cfg.min_events),
        *[e.ExpectColumnToExist(column=c) for c in EVENT_SCHEMA.names],
        *[e.ExpectColumnValuesToNotBeNull(column=c, mostly=mostly) for c in (*ID_COLUMNS, "event_ts")],
        # Rule "blank_id", on the flags the feature job computes (null for a null id).
        *[e.ExpectColumnValuesToBeInSet(column=flag, value_set=[False], mostly=mostly) for flag in BLANK_ID_FLAGS.values()],
        e.ExpectColumnValuesToBeInSet(column="event_type", value_set=list(EVENT_TYPES), mostly=mostly),
        # The window is [start, end); GX's max is inclusive, so stop one microsecond before end.
        e.ExpectColumnValuesToBeBetween(column="event_ts", min_value=start, max_value=end - dt.timedelta(microseconds=1), mostly=mostly),
        # Rule "conflicting_event_id", on the copies count the feature job computes while it
        # removes exact duplicates: GX's own uniqueness check would sort every event again.
        e.ExpectColumnValuesToBeBetween(column=EVENT_ID_COPIES, min_value=1, max_value=1, mostly=mostly),
        # An upper bound catches +inf (rule "non_finite_value"); -inf is below MIN_VALUE.
        e.ExpectColumnValuesToBeBetween(column="value", min_value=MIN_VALUE, max_value=sys.float_info.max, mostly=mostly),
    ]


def with_pair_key(interactions: Any) -> Any:
    """The interactions with :data:`PAIR_KEY`, ``user_idx * 2**32 + item_idx``: one long per (user, item) pair.

    Works on a Spark or pandas DataFrame; the feature suite checks the pairs' uniqueness on it.
    """
    if type(interactions).__module__.startswith("pyspark"):
        from pyspark.sql import functions as F

        return interactions.withColumn(PAIR_KEY, F.col("user_idx").cast("long") * PAIR_BASE + F.col("item_idx"))
    return interactions.assign(**{PAIR_KEY: interactions["user_idx"].astype("Int64") * PAIR_BASE + interactions["item_idx"]})


def feature_suites() -> dict[str, list]:
    """Expectations on every feature table; all are strict (no tolerance). The interactions
    frame carries, besides the table's columns, :data:`PAIR_KEY` (:func:`with_pair_key`).

    Returns:
        Table name -> GX expectation objects.
    """
    import great_expectations as gx

    e = gx.expectations
    ids = lambda *cols: [e.ExpectColumnValuesToNotBeNull(column=c) for c in cols]  # noqa: E731
    return {
        "interactions": [
            e.ExpectTableRowCountToBeBetween(min_value=1),
            *ids("user_id", "item_id", "user_idx", "item_idx", "split", "first_ts"),
            # One row per (user, item), checked on the indices (the vocabulary checks below make each
            # index stand for exactly one id), packed in one long: GX sorts the table by the checked
            # column, 2x faster by a long than by the struct of two columns.
            e.ExpectColumnValuesToBeUnique(column=PAIR_KEY),
            e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
            e.ExpectColumnValuesToBeBetween(column="weight", min_value=0.0, strict_min=True),
            e.ExpectColumnValuesToBeBetween(column="user_idx", min_value=1),
            e.ExpectColumnValuesToBeBetween(column="item_idx", min_value=1),
        ],
        "user_features": [
            *ids("user_id", "user_idx", "history_item_idx"),
            e.ExpectColumnValuesToBeUnique(column="user_id"),
            # Every user with validation or test interactions must have train history.
            e.ExpectColumnValuesToBeBetween(column="n_train", min_value=1),
            e.ExpectColumnValuesToBeBetween(column="recency_days", min_value=0.0),
        ],
        "item_features": [
            *ids("item_id", "item_idx", "popularity"),
            e.ExpectColumnValuesToBeUnique(column="item_id"),
            e.ExpectColumnValuesToBeBetween(column="popularity", min_value=0),
        ],
        "user_vocab": [*ids("user_id", "user_idx"), e.ExpectColumnValuesToBeUnique(column="user_id"), e.ExpectColumnValuesToBeUnique(column="user_idx")],
        "item_vocab": [*ids("item_id", "item_idx"), e.ExpectColumnValuesToBeUnique(column="item_id"), e.ExpectColumnValuesToBeUnique(column="item_idx")],
    }


def validate(frames: Mapping[str, Any], suites: Mapping[str, list], docs_dir: str | Path) -> dict[str, dict]:
    """Run each suite on its frame, build Data Docs, and raise if any expectation failed.

    Args:
        frames: Suite name -> Spark or pandas DataFrame.
        suites: Suite name -> expectations (same keys as ``frames``).
        docs_dir: Where GX writes the HTML Data Docs site.

    Returns:
        Suite name -> ``{"expectations": n, "rows": element count or None}`` when all pass.

    Raises:
        DataValidationError: Naming every failed expectation across all suites.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    docs_dir = Path(docs_dir).resolve()
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(
        site_name="pipeline",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        },
    )
    failures: list[ExpectationFailure] = []
    summary: dict[str, dict] = {}
    for name, frame in frames.items():
        is_spark = type(frame).__module__.startswith("pyspark")
        # persist=False: GX would cache every frame it is given (and never release it), a second
        # copy of the cached events and a full read of each written table; the job caches what it reuses.
        source = (ctx.data_sources.add_spark(name=f"{name}_src", persist=False) if is_spark
                  else ctx.data_sources.add_pandas(name=f"{name}_src"))
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=list(suites[name])))
        definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # A passing table is read once: BOOLEAN_ONLY computes every count in one aggregate
        # pass, where BASIC also runs one query per expectation for examples of bad rows.
        # Only a failing table is validated again, with those examples, for the error and the docs.
        for result_format in ("BOOLEAN_ONLY", "BASIC"):
            checkpoint = ctx.checkpoints.add(
                gx.Checkpoint(
                    name=f"{name}_checkpoint_{result_format.lower()}",
                    validation_definitions=[definition],
                    result_format={"result_format": result_format, "partial_unexpected_count": 5},
                )
            )
            outcome = checkpoint.run(batch_parameters={"dataframe": frame})
            if outcome.success:
                break
        results = [r for run in outcome.run_results.values() for r in run.results]
        summary[name] = {"expectations": len(results), "success": bool(outcome.success)}
        for result in results:
            if result.success:
                continue
            config, found = result.expectation_config, result.result or {}
            failures.append(
                ExpectationFailure(
                    suite=name,
                    expectation=config.type,
                    column=config.kwargs.get("column") or (",".join(config.kwargs.get("column_list", [])) or None),
                    unexpected_count=found.get("unexpected_count"),
                    element_count=found.get("element_count"),
                    examples=[_pair(v) if config.kwargs.get("column") == PAIR_KEY else _plain(v)
                              for v in (found.get("partial_unexpected_list") or [])[:5]],
                    observed_value=_plain(found.get("observed_value")),
                )
            )
            if result.exception_info and result.exception_info.get("raised_exception"):
                log.error("GX raised in %s: %s", name, result.exception_info.get("exception_message"))
        log.info("validated %-14s %2d expectations: %s", name, len(results), "passed" if outcome.success else "FAILED")
    # Once for every result the checkpoints stored: a build per checkpoint re-rendered all the
    # pages so far (15 page renders for the 5 feature tables, 2.4 of GX's 5 s of overhead).
    ctx.build_data_docs(site_names=["pipeline"])
    if failures:
        raise DataValidationError(failures, docs_dir)
    return summary


def _pair(value: Any) -> Any:
    """A :data:`PAIR_KEY` example as the ``(user_idx, item_idx)`` it stands for."""
    return tuple(divmod(int(value), PAIR_BASE)) if value is not None else None


def _plain(value: Any) -> Any:
    """Make a GX value printable in one line (timestamps, numpy scalars)."""
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return value
