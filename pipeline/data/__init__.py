"""Raw event-log contract, the MovieLens converter and the synthetic log generator."""

from pipeline.data.contract import (
    EVENT_SCHEMA,
    EVENT_TYPES,
    ITEM_SCHEMA,
    USER_SCHEMA,
    event_partition_dir,
    write_event_partition,
)
from pipeline.data.movielens import convert_movielens
from pipeline.data.synthetic import generate_synthetic_logs

__all__ = [
    "EVENT_SCHEMA",
    "EVENT_TYPES",
    "ITEM_SCHEMA",
    "USER_SCHEMA",
    "convert_movielens",
    "event_partition_dir",
    "generate_synthetic_logs",
    "write_event_partition",
]
