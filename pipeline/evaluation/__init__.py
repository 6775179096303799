"""Offline evaluation: every model judged the same way, on the same split.

* :mod:`~pipeline.evaluation.metrics`: pure ranking metrics of a batch of masked scores;
* :mod:`~pipeline.evaluation.scorers`: anything that scores all items for a batch of users;
* :mod:`~pipeline.evaluation.harness`: full-ranking evaluation of a scorer on a split;
* :mod:`~pipeline.evaluation.baselines`: the Spark MLlib ALS baseline, folded in user by user;
* :mod:`~pipeline.evaluation.ease`: the EASE item-item baseline in closed form, l2 chosen on validation;
* :mod:`~pipeline.evaluation.serving_cost`: parameters, bytes and latency of exported models.

The pipeline step that evaluates a run's models is :mod:`pipeline.steps.evaluate`.
"""

from pipeline.evaluation.baselines import FoldInScorer, fit_als, train_als_model
from pipeline.evaluation.ease import EaseScorer, ease_skip_reason, ease_weights, fit_ease
from pipeline.evaluation.harness import evaluate_scorer
from pipeline.evaluation.metrics import COVERAGE_K, HITRATE_K, ranking_metrics, top_k_items
from pipeline.evaluation.scorers import EmbeddingScorer, History, MostPopularScorer, QueryScorer, SavedModelScorer, Scorer
from pipeline.evaluation.serving_cost import directory_bytes, limit_tf_threads, measure_latency, saved_model_bytes

__all__ = [
    "COVERAGE_K", "HITRATE_K", "EaseScorer", "EmbeddingScorer", "FoldInScorer", "History", "MostPopularScorer",
    "QueryScorer", "SavedModelScorer", "Scorer", "directory_bytes", "ease_skip_reason", "ease_weights", "evaluate_scorer",
    "fit_als", "fit_ease", "limit_tf_threads", "measure_latency", "ranking_metrics", "saved_model_bytes", "top_k_items",
    "train_als_model",
]
