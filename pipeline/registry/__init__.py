"""Model registry in TF Serving layout: versions, lineage, a champion alias, and journals.

Layout under ``<registry>/``::

    models.config                   TF Serving config pinning every model to its champion
    serving.json                    per model: champion, its SavedModel (query tower) and faiss index
    <model>/1/ 2/ ...               TF Serving versions (saved_model.pb, variables/), integers that only grow
    <model>/<N>/serving_index/      the version's faiss index of item vectors (pipeline.serving)
    <model>/<N>/assets.extra/lineage.json   ds, run id, teacher version, features, soft targets,
                                    config hash, metrics, blessing (TF Serving ignores assets.extra)
    <model>/champion.json           the current champion, and the champions before it (for rollback)
    <model>/champion_log.jsonl      every champion decision, appended: promote, rollback, rerun, refused
    <model>/runs.jsonl              every run attempt, appended: BLESSED / NOT_BLESSED and why
    <model>/.lock                   the lock that serialises writers of this model

A version is copied into a locked temporary directory and flushed outside the lock; under
the lock it gets the next number and is renamed into place (TF Serving and readers never
see a partial version). A champion change is journaled first, then ``champion.json`` and
``models.config`` are rewritten atomically: the journal is the record, and every writer
(and :meth:`Registry.reconcile`, which the next run's evaluation calls) first brings the
two files in line with it, so a crash between the steps is rolled forward and the champion
a run is gated against is the one being served.

Promotion is a compare-and-swap: the caller names the champion its student was evaluated
against, and the promotion is refused (journaled as ``refused``) when another promotion
or a rollback has moved the champion since. A re-run of a ``run_key`` published before
adds no version and leaves the champion where it is, so an operator's rollback holds until
the next new blessed promotion; a version published by an attempt that died before its
promotion was journaled is completed only if no champion change came after it.
``python -m pipeline.registry`` lists, shows and rolls back.
"""

from pipeline.registry.cli import main, print_listing
from pipeline.registry.store import (ANY_CHAMPION, CHAMPION_FILE, CHAMPION_LOG, DEFAULT_MODEL, MODELS_CONFIG, RUN_LOG, Promotion,
                                     Registry, RegistryError)

__all__ = ["ANY_CHAMPION", "CHAMPION_FILE", "CHAMPION_LOG", "DEFAULT_MODEL", "MODELS_CONFIG", "RUN_LOG", "Promotion", "Registry",
           "RegistryError", "main", "print_listing"]
