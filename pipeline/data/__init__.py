"""Raw event-log contract; the MovieLens converter and the synthetic generator live in their modules."""

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
