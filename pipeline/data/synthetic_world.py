"""The static world behind the synthetic event logs: items, users, their tastes and tables.

* **Items** follow Zipf-like popularity (weight ``rank ** -1.1``, ranks shuffled over
  item ids) and each belongs to one of ``K`` taste clusters; an item's first category is
  its cluster's, some carry a second, random one.
* **Users** each have one taste cluster and a log-normal activity level (a few heavy
  users, many light ones).

:func:`build_world` draws all of it from one seeded stream and returns the
:class:`World` the event simulation (:mod:`pipeline.data.synthetic`) samples from, plus
the item catalogue and user profile tables of the raw contract.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.contract import ITEM_SCHEMA, USER_SCHEMA

# The shape of the synthetic world. These are properties of the generator, not knobs of
# a pipeline run, so they live here rather than in pipeline/config.py.
POPULARITY_EXPONENT = 1.1
TASTE_CLUSTERS = 20
SECOND_CATEGORY_SHARE = 0.3
FIRST_ITEM_YEAR, LAST_ITEM_YEAR = 1980, 2023
MIN_USER_AGE, MAX_USER_AGE = 16, 75
OCCUPATIONS = (
    "student", "engineer", "educator", "healthcare", "artist", "administrator",
    "sales", "writer", "scientist", "technician", "retired", "other",
)

# Keys of the independent random streams derived from the seed, all listed here so that
# no two purposes share one.
STREAM_WORLD, STREAM_DAY_SPLIT, STREAM_BLOCK = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class World:
    """The static side of the simulation, shared by every block of events.

    Attributes:
        user_ids: ``[users]`` string ids.
        item_ids: ``[items]`` string ids.
        user_cluster: ``[users]`` taste cluster of each user.
        item_cluster: ``[items]`` taste cluster of each item.
        item_price: ``[items]`` price charged on purchase.
        item_quality: ``[items]`` offset added to every rating of the item.
        user_cdf: ``[users]`` cumulative activity share, for sampling who visits.
        popularity_cdf: ``[items]`` cumulative popularity share over all items.
        cluster_cdf: ``[items]`` for items sorted by cluster, ``cluster + cumulative
            popularity share inside the cluster``; searching ``cluster + u`` with
            ``u ~ U[0, 1)`` samples one item of that cluster in a single vectorised call.
        cluster_order: ``[items]`` item index at each position of ``cluster_cdf``.
    """

    user_ids: pa.Array
    item_ids: pa.Array
    user_cluster: np.ndarray
    item_cluster: np.ndarray
    item_price: np.ndarray
    item_quality: np.ndarray
    user_cdf: np.ndarray
    popularity_cdf: np.ndarray
    cluster_cdf: np.ndarray
    cluster_order: np.ndarray


def cumulative_share(weights: np.ndarray) -> np.ndarray:
    """The cumulative share of ``weights``, ending at exactly 1.

    Args:
        weights: ``[n]`` non-negative weights with a positive sum.

    Returns:
        ``[n]`` cumulative shares; ``searchsorted(cdf, u, side="right")`` with
        ``u ~ U[0, 1)`` draws index ``i`` with probability ``weights[i] / sum(weights)``.
    """
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf[-1] = 1.0  # exactly 1 so that a uniform draw in [0, 1) never falls past the end
    return cdf


def _prefixed_ids(prefix: str, count: int) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.arange(count)), pa.string()), "")


def build_world(users: int, items: int, seed: int) -> tuple[World, pa.Table, pa.Table]:
    """Draw users, items and their tastes from the seed's world stream.

    Items are spread over ``min(TASTE_CLUSTERS, items)`` taste clusters.

    Args:
        users: Number of users (ids ``u0`` ...).
        items: Number of items (ids ``i0`` ...).
        seed: Seed of every random draw.

    Returns:
        The world, the item catalogue (:data:`ITEM_SCHEMA`) and the user profiles
        (:data:`USER_SCHEMA`).
    """
    clusters = min(TASTE_CLUSTERS, items)
    rng = np.random.default_rng([seed, STREAM_WORLD])

    popularity_rank = rng.permutation(items) + 1
    popularity = popularity_rank.astype(np.float64) ** -POPULARITY_EXPONENT
    # Round-robin over a shuffle gives every cluster items even when items ~ clusters.
    item_cluster = (np.arange(items) % clusters)[rng.permutation(items)]
    item_price = np.round(rng.lognormal(mean=3.0, sigma=0.8, size=items), 2)
    item_quality = rng.normal(0.0, 0.4, size=items)
    item_year = rng.integers(FIRST_ITEM_YEAR, LAST_ITEM_YEAR + 1, size=items)

    cluster_order = np.lexsort((np.arange(items), item_cluster))
    sorted_cluster = item_cluster[cluster_order]
    sorted_popularity = popularity[cluster_order]
    cumulative = np.cumsum(sorted_popularity)
    cluster_first = np.searchsorted(sorted_cluster, np.arange(clusters))
    cluster_total = np.add.reduceat(sorted_popularity, cluster_first)
    before_cluster = cumulative[cluster_first] - sorted_popularity[cluster_first]
    share_in_cluster = (cumulative - before_cluster[sorted_cluster]) / cluster_total[sorted_cluster]
    share_in_cluster[np.r_[cluster_first[1:] - 1, items - 1]] = 1.0
    cluster_cdf = sorted_cluster + share_in_cluster

    user_cluster = rng.integers(0, clusters, size=users)
    user_activity = rng.lognormal(mean=0.0, sigma=1.0, size=users)
    user_age = rng.integers(MIN_USER_AGE, MAX_USER_AGE + 1, size=users)
    user_gender = rng.choice(np.array(["F", "M"]), size=users)
    user_occupation = rng.choice(np.array(OCCUPATIONS), size=users)

    category_names = np.array([f"category-{k:02d}" for k in range(clusters)])
    has_second = rng.random(items) < SECOND_CATEGORY_SHARE
    # Shifting by 1..clusters-1 keeps the second category different from the first.
    second_cluster = (item_cluster + rng.integers(1, max(clusters, 2), size=items)) % clusters
    has_second &= clusters > 1
    categories_per_item = 1 + has_second.astype(np.int32)
    category_values = np.empty(int(categories_per_item.sum()), dtype=object)
    offsets = np.r_[0, np.cumsum(categories_per_item)].astype(np.int32)
    category_values[offsets[:-1]] = category_names[item_cluster]
    category_values[offsets[:-1][has_second] + 1] = category_names[second_cluster[has_second]]

    item_ids = _prefixed_ids("i", items)
    user_ids = _prefixed_ids("u", users)
    items_table = pa.table(
        {
            "item_id": item_ids,
            "title": pc.binary_join_element_wise("Item ", pc.cast(pa.array(np.arange(items)), pa.string()), ""),
            "year": pa.array(item_year, pa.int32()),
            "categories": pa.ListArray.from_arrays(pa.array(offsets), pa.array(category_values, pa.string())),
        }
    ).cast(ITEM_SCHEMA)
    users_table = pa.table(
        {
            "user_id": user_ids,
            "age": pa.array(user_age, pa.int32()),
            "gender": pa.array(user_gender, pa.string()),
            "occupation": pa.array(user_occupation, pa.string()),
        }
    ).cast(USER_SCHEMA)
    world = World(
        user_ids=user_ids,
        item_ids=item_ids,
        user_cluster=user_cluster,
        item_cluster=item_cluster,
        item_price=item_price,
        item_quality=item_quality,
        user_cdf=cumulative_share(user_activity),
        popularity_cdf=cumulative_share(popularity),
        cluster_cdf=cluster_cdf,
        cluster_order=cluster_order,
    )
    return world, items_table, users_table
