"""Model code: two-tower models, distillation losses, the training loop and the retrieval index.

* :mod:`~pipeline.modeling.models`: teacher and student builders, export;
* :mod:`~pipeline.modeling.losses`: the distillation loss terms;
* :mod:`~pipeline.modeling.training`: the ``tf.data`` input and the early-stopping loop;
* :mod:`~pipeline.modeling.retrieval`: the top-K indexes saved inside the exported models;
* :mod:`~pipeline.modeling.partitions`: the balanced k-means partitions of the IVF index.

Import from the modules (each loads TensorFlow or numpy only when it is used). Nothing here
imports a step (:mod:`pipeline.steps`).
"""
