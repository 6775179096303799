"""Recommender-distillation pipeline library.

Importing this package is the one place that prepares the environment for every entry
point (Airflow tasks, ``python -m`` CLIs, Spark jobs, tests): TensorFlow Recommenders
0.7.7 refuses Keras 3, so TensorFlow must load the legacy ``tf_keras`` and that switch
only works if it is set before TensorFlow is first imported.
"""

import os
import sys

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise ImportError(
        "TensorFlow was imported before `pipeline`; import `pipeline` first so that "
        "TF_USE_LEGACY_KERAS=1 takes effect (TFRS 0.7.7 needs tf-keras, not Keras 3)."
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
