"""The environment the pins promise: one pyspark, legacy Keras for TFRS."""

import os

import pipeline  # noqa: F401


def test_pyspark_python_matches_the_jvm(spark):
    # pyspark-client writes its own pyspark files over pyspark's: a version skew shows here.
    import pyspark

    assert pyspark.__version__ == spark.version


def test_tensorflow_uses_legacy_keras_for_tfrs():
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    assert tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__
    assert isinstance(tfrs.layers.factorized_top_k.BruteForce(), tf.keras.layers.Layer)
