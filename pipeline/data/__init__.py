"""Data in and out of the pipeline: the raw event-log contract (re-exported here), the raw
window's pre-flight (:mod:`~pipeline.data.raw_files`), the MovieLens converter and the synthetic
generator, and the reader of the feature job's output (:mod:`~pipeline.data.features`)."""

from pipeline.data.contract import (
    EVENT_SCHEMA,
    EVENT_TYPES,
    ITEM_SCHEMA,
    USER_SCHEMA,
    event_partition_dir,
    write_event_partition,
)

# The converter and the generator are run as `python -m pipeline.data.<module>`; importing
# them here would load them twice. Import them from their modules.

__all__ = [
    "EVENT_SCHEMA",
    "EVENT_TYPES",
    "ITEM_SCHEMA",
    "USER_SCHEMA",
    "event_partition_dir",
    "write_event_partition",
]
