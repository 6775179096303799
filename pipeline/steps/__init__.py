"""The pipeline's steps: what the DAG's tasks, the ``python -m`` CLIs, the benchmarks and the tests call.

* :mod:`~pipeline.steps.train_teacher`: train the teacher and export it;
* :mod:`~pipeline.steps.soft_targets`: the teacher's batch soft targets;
* :mod:`~pipeline.steps.distill`: distil the student from them;
* :mod:`~pipeline.steps.evaluate`: every model of a run judged side by side;
* :mod:`~pipeline.steps.chain`: teacher -> soft targets -> student in one call;
* :mod:`~pipeline.steps.run`: run-level steps (settings, checks, gate, promotion, report).

Layering: a step may import anything in ``pipeline``; nothing in ``pipeline`` outside this
package (nor ``spark_jobs`` or ``deploy``) imports a step (tests/test_architecture.py).
Import each step from its module: importing them here would load TensorFlow for every task.
"""
