"""Which raw files are data, and whether what they store satisfies the contract.

One rule picks the files (:func:`data_files`); one check judges each file by its Parquet
footer the way Spark will read it (:func:`check_file`); files without rows are checked
but never read (:func:`check_event_files`). The pre-flight check (:func:`check_raw_window`)
and the Spark feature job both go through them, and the job hands Spark the checked file
list, never a directory, so the two cannot disagree about what a partition holds. Every
error names the file, the column and the rule.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.contract import EVENT_SCHEMA, SIDE_TABLES, RawWindowError, side_table_dir, window_partitions

log = logging.getLogger(__name__)

# A directory entry whose name starts with one of these is not data: writers' markers
# (_SUCCESS), checksums (.crc), unfinished output (_temporary/, .staging). Spark and pyarrow
# skip them too.
HIDDEN_PREFIXES = ("_", ".")
DATA_FILE_SUFFIX = ".parquet"


@dataclasses.dataclass(frozen=True)
class CheckedFile:
    """A data file whose Parquet footer satisfies the contract.

    Attributes:
        path: The file.
        rows: Its row count, from the footer.
        columns: The contract's columns as the file stores them, in contract order, spelled
            the way Spark reads them: any string encoding as ``string``, a list of strings
            as ``list<string>``, an all-null column of Parquet's null type as ``null``, a
            UTC timestamp in milliseconds, microseconds or INT96 as ``timestamp[us, UTC]``
            and one in nanoseconds as ``timestamp[ns, UTC]`` (Spark reads those only as
            integers, see :func:`check_file`). Files with equal ``columns`` can be read
            together under one schema. Fields carry the contract's names, which Spark
            matches to the stored ones ignoring case (see :func:`check_file`). Empty for
            a file without rows: its types are not judged, as nothing reads it.
    """

    path: Path
    rows: int
    columns: pa.Schema


def data_files(directory: str | Path) -> list[Path]:
    """The data files of one event partition or side-table directory, sorted by name.

    This is the one file-selection rule: the pre-flight check judges exactly these files,
    and the Spark job passes exactly these paths to Spark (never the directory, whose
    listing Spark would do by its own rule).

    Rule: an entry whose name starts with ``_`` or ``.`` is skipped, as Spark and pyarrow
    skip it (:data:`HIDDEN_PREFIXES`). Every other entry must be a file named ``*.parquet``.
    Anything else (a sub-directory, a file with another suffix) is rejected rather than
    skipped: given the directory, Spark would read it as data, and skipping it silently
    could drop a day of events.

    Args:
        directory: An event partition (``ds=YYYY-MM-DD``) or a side-table directory.

    Returns:
        The data files, sorted by name.

    Raises:
        RawWindowError: Naming the entry that is neither hidden nor a ``.parquet`` file.
    """
    directory = Path(directory)
    files = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(HIDDEN_PREFIXES):
            continue
        if entry.is_dir():
            raise RawWindowError(
                f"{entry}: a sub-directory of {directory.name}/; data files must sit directly in it "
                f"(Spark would read the files inside, the contract does not name them): move them up, "
                f"or hide the directory with a leading '_' or '.'"
            )
        if not entry.name.endswith(DATA_FILE_SUFFIX):
            raise RawWindowError(
                f"{entry}: not a {DATA_FILE_SUFFIX} file; every file in {directory.name}/ whose name does not start "
                f"with '_' or '.' is data: rename it to *{DATA_FILE_SUFFIX}, or hide it with a leading '_' or '.'"
            )
        files.append(entry)
    return files


def _is_string(found: pa.DataType) -> bool:
    """Every Arrow spelling of Parquet's UTF-8 byte array (Spark reads them all as string)."""
    if pa.types.is_dictionary(found):
        found = found.value_type
    return pa.types.is_string(found) or pa.types.is_large_string(found) or pa.types.is_string_view(found)


def stored_type(found: pa.DataType, wanted: pa.DataType, nullable: bool = True) -> pa.DataType | None:
    """How a column stored as ``found`` satisfies the contract's ``wanted`` type, or None.

    Accepted: any string encoding (plain, large, view, dictionary) for a string; float32 or
    float64 for float64; a signed integer or a float for an integer (pandas stores an integer
    column with gaps as float64; the job casts); a list of strings for a list of strings; a
    timestamp with a time zone (UTC adjusted) for a timestamp; and Parquet's null type (an
    all-null column, as pandas writes an all-None one) for any nullable column.

    Args:
        found: The stored Arrow type.
        wanted: The contract's type.
        nullable: Whether the contract lets the column be null.

    Returns:
        ``found`` normalised the way Spark reads it (see :class:`CheckedFile`), or None when
        it does not satisfy ``wanted``.
    """
    if pa.types.is_null(found):
        return found if nullable else None
    if pa.types.is_string(wanted):
        return pa.string() if _is_string(found) else None
    if pa.types.is_floating(wanted):
        return found if found in (pa.float32(), pa.float64()) else None  # Spark reads no half floats
    if pa.types.is_integer(wanted):
        return found if pa.types.is_signed_integer(found) or found in (pa.float32(), pa.float64()) else None
    if pa.types.is_list(wanted):
        lists = pa.types.is_list(found) or pa.types.is_large_list(found)
        return pa.list_(pa.string()) if lists and _is_string(found.value_type) else None
    if pa.types.is_timestamp(wanted):
        return found if pa.types.is_timestamp(found) and found.tz is not None else None
    return found if found == wanted else None


def _type_problem(name: str, found: pa.DataType, field: pa.Field) -> str:
    """What is wrong with column ``name`` stored as ``found`` where the contract has ``field``."""
    if pa.types.is_null(found):
        return f"{name} is null-typed (every value null), but the contract says {name} must hold values"
    return f"{name} is {found}, expected {field.type}"


def schema_problems(schema: pa.Schema, contract: pa.Schema = EVENT_SCHEMA) -> list[str]:
    """Every way ``schema`` breaks ``contract``: missing columns and wrong types (:func:`stored_type`)."""
    missing = [f.name for f in contract if f.name not in schema.names]
    wrong = [_type_problem(f.name, schema.field(f.name).type, f) for f in contract
             if f.name in schema.names and stored_type(schema.field(f.name).type, f.type, f.nullable) is None]
    return ([f"lacks column(s) {missing}"] if missing else []) + wrong


_PARQUET_UNITS = {"milliseconds": "ms", "microseconds": "us", "nanoseconds": "ns"}


def _stored_timestamp(meta: pq.FileMetaData, field: pa.Field, found: pa.DataType, name: str,
                      label: str) -> tuple[pa.DataType | None, str | None]:
    """A timestamp column (stored as ``name``, called ``label`` in errors) judged by its
    Parquet encoding, which is what Spark reads.

    The Arrow type alone can mislead: pyarrow shows INT96 as a naive ``timestamp[ns]`` and
    may restore a unit from its own metadata that differs from the stored one.
    """
    column = next((meta.schema.column(i) for i in range(meta.num_columns) if meta.schema.column(i).path == name), None)
    if column is None or pa.types.is_null(found):
        return None, _type_problem(label, found, field)
    if column.physical_type == "INT96":  # the legacy Impala/Spark encoding of UTC instants; Spark reads it as one
        return pa.timestamp("us", tz="UTC"), None
    logical = json.loads(column.logical_type.to_json())
    if logical.get("Type") != "Timestamp":
        return None, _type_problem(label, found, field)
    if not logical["isAdjustedToUTC"]:
        return None, (
            f"{label} is a timestamp without a time zone ({found}, Parquet isAdjustedToUTC=false), expected UTC "
            f"instants: the zone its values are in is unknown, so no day can be assigned; write it time-zone aware "
            f"(pandas: .dt.tz_localize('UTC'), pyarrow: pa.timestamp(unit, tz='UTC'))"
        )
    unit = _PARQUET_UNITS[logical["timeUnit"]]
    return pa.timestamp("ns" if unit == "ns" else "us", tz="UTC"), None


def _name_problems(names: Sequence[str], contract: pa.Schema) -> tuple[dict[str, str], list[str]]:
    """Find the contract's columns among a file's column ``names`` as Spark does: case-insensitively.

    Spark matches the names of the schema it is given to a file's columns ignoring case
    (its default, ``spark.sql.caseSensitive=false``): it reads ``USER_ID`` as ``user_id``,
    and fails on a file that has both.

    Returns:
        Contract column -> the name the file stores it under, for each found once; and the
        problems: missing columns, and columns stored more than once.
    """
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(name.lower(), []).append(name)
    found = {f.name: spellings.get(f.name.lower(), []) for f in contract}
    missing = [column for column, stored in found.items() if not stored]
    repeated = [column for column, stored in found.items() if len(stored) > 1 and len(set(stored)) == 1]
    problems = ([f"lacks column(s) {missing}"] if missing else []) + ([f"has column(s) {repeated} more than once"] if repeated else [])
    problems += [f"has columns {stored} that Spark reads as one, {column}: it matches column names ignoring case "
                 f"(spark.sql.caseSensitive=false) and cannot tell them apart; keep one"
                 for column, stored in found.items() if len(set(stored)) > 1]
    return {column: stored[0] for column, stored in found.items() if len(stored) == 1}, problems


def check_file(path: str | Path, contract: pa.Schema) -> CheckedFile:
    """Judge one data file by its Parquet footer against ``contract``, the way Spark will read it.

    Column names match as Spark matches them, ignoring case (``USER_ID`` is read as
    ``user_id``); a file storing one column under two such names is rejected, as Spark
    would fail on it. A file without rows is judged by its column names alone: it holds no
    value, so its types cannot matter (pandas writes an empty frame's object columns as
    Parquet's null type, ids included), and it is never read (:func:`check_event_files`).

    Timestamps: any Parquet unit is accepted when the column is UTC adjusted (or INT96).
    Milliseconds and microseconds Spark reads as timestamps; nanoseconds (pandas' default)
    it reads only as integers, so the job reads those as integers and floors them to
    microseconds, Spark's precision. A timestamp without a time zone is rejected: which
    zone its values are in is unknown. Other columns follow :func:`stored_type`.

    Args:
        path: A Parquet file chosen by :func:`data_files`.
        contract: The schema it must satisfy (:data:`EVENT_SCHEMA` or a side table's).

    Returns:
        The file, its row count and how it stores the contract's columns.

    Raises:
        RawWindowError: ``<file>: <column> ...`` for every column at fault, or naming the
            file when it is not Parquet at all.
    """
    path = Path(path)
    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise RawWindowError(f"corrupt Parquet file {path}: {err}") from err
    names, problems = _name_problems(schema.names, contract)
    if meta.num_rows == 0:
        if problems:
            raise RawWindowError(f"{path}: " + "; ".join(problems))
        return CheckedFile(path=path, rows=0, columns=pa.schema([]))
    columns = []
    for field in contract:
        if field.name not in names:
            continue
        name, found = names[field.name], schema.field(names[field.name]).type
        label = name if name == field.name else f"{name} (read as {field.name})"
        if pa.types.is_timestamp(field.type):
            stored, problem = _stored_timestamp(meta, field, found, name, label)
        else:
            stored = stored_type(found, field.type, field.nullable)
            problem = None if stored is not None else _type_problem(label, found, field)
        if problem:
            problems.append(problem)
        else:
            columns.append(pa.field(field.name, stored))
    if problems:
        raise RawWindowError(f"{path}: " + "; ".join(problems))
    return CheckedFile(path=path, rows=meta.num_rows, columns=pa.schema(columns))


def _with_rows(files: Sequence[CheckedFile]) -> list[CheckedFile]:
    """The files a reader is given: those holding rows.

    A file without rows adds nothing, and its types need not be the contract's
    (:func:`check_file`): Spark reads pandas' empty null-typed columns as int and fails to
    merge them with another file's strings. The pre-flight check counts these files and
    the Spark job (and the DuckDB benchmark) reads them, so they agree on what is read.
    """
    for empty in (f for f in files if not f.rows):
        log.info("%s: no rows, not read", empty.path)
    return [f for f in files if f.rows]


def check_event_files(partitions: Sequence[Path]) -> list[CheckedFile]:
    """Every data file of ``partitions`` (:func:`data_files`), judged by :func:`check_file`.

    Returns:
        The files holding rows, the ones to read (a file without rows is checked, then left out).

    Raises:
        RawWindowError: Naming the first file, column and rule at fault.
    """
    return _with_rows([check_file(path, EVENT_SCHEMA) for partition in partitions for path in data_files(partition)])


def check_side_table(raw_root: str | Path, name: str) -> list[CheckedFile]:
    """The data files of side table ``name`` (``items`` or ``users``), judged by :func:`check_file`.

    Returns:
        The files holding rows, the ones to read (as :func:`check_event_files`); none when
        the table's directory does not exist (side features are then null).

    Raises:
        RawWindowError: Naming the file, column and rule at fault.
    """
    directory = side_table_dir(raw_root, name)
    if not directory.is_dir():
        return []
    return _with_rows([check_file(path, SIDE_TABLES[name]) for path in data_files(directory)])


def check_raw_window(raw_root: str | Path, window_start: dt.date, window_end: dt.date, min_events: int) -> dict:
    """Cheap structural checks of the raw window from Parquet footers alone (no Spark).

    Every data file (:func:`data_files` of each partition and side table) must be Parquet
    and hold the contract's columns, with types Spark can read as the contract's when it
    holds rows (:func:`check_file`); the window must hold at least ``min_events`` rows.
    Row-level checks (nulls, blank ids, event types, duplicates) run in the Spark job.

    Returns:
        ``{"partitions", "files", "rows"}`` of the event window; ``files`` counts the files
        the feature job reads, those holding rows.

    Raises:
        RawWindowError: Naming the file, column and rule at fault.
    """
    partitions = window_partitions(raw_root, window_start, window_end)
    files = check_event_files(partitions)
    rows = sum(f.rows for f in files)
    side = {name: len(check_side_table(raw_root, name)) for name in SIDE_TABLES}
    if rows < min_events:
        raise RawWindowError(f"empty window: {rows} event(s) in ds={window_start}..ds={window_end}, need >= {min_events}")
    log.info("raw window ds=%s..ds=%s: %d partitions, %d files, %d rows; side-table files %s",
             window_start, window_end, len(partitions), len(files), rows, side)
    return {"partitions": len(partitions), "files": len(files), "rows": rows}
