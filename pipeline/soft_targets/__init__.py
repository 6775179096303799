"""The teacher's soft targets: scoring users, the Spark engine, and reading them back for training.

* :mod:`~pipeline.soft_targets.teacher_scoring`: a restored teacher's top-K per user, known items excluded;
* :mod:`~pipeline.soft_targets.spark_engine`: the same scoring in Spark's Python workers;
* :mod:`~pipeline.soft_targets.rows`: the soft targets as per-user columns of the student's input.

The step that writes them is :mod:`pipeline.steps.soft_targets`. Import from the modules
(TensorFlow and Spark load only where they are used). Nothing here imports a step.
"""
