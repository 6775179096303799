"""``python -m pipeline.serving`` (``recsys-serve``): the top K items of a registry version for user ids."""

from __future__ import annotations

import argparse
import sys

from pipeline.catalog import Catalog
from pipeline.registry import DEFAULT_MODEL, Registry, RegistryError
from pipeline.serving.model import ServingModel


def main(argv=None) -> int:
    """Load a registry version (the champion by default) and print each user's top K with scores.

    Returns:
        0; 1 (with the reason on stderr) when the model has no such version, no champion, or
        a version exported without a serving index.
    """
    parser = argparse.ArgumentParser(description="Serve the top K items of a registry version for user ids.")
    parser.add_argument("--data-root", default="data", help="the data root holding registry/ (default: data)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"the registry's model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--version", type=int, help="the version to serve (default: the champion)")
    parser.add_argument("--user-id", action="append", required=True, dest="user_ids", help="a user id (repeat for more)")
    parser.add_argument("--k", type=int, default=10, help="items per user (default: 10)")
    parser.add_argument("--threads", type=int, default=2, help="faiss threads (default: 2)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    registry = Registry(Catalog(args.data_root).registry_root, args.model)
    try:
        version = registry.champion() if args.version is None else args.version
        if version is None:
            raise RegistryError(f"{args.model} has no champion under {registry.root}: pass --version")
        model = ServingModel.load(registry.version_dir(version), args.threads)
    except (RegistryError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    record = model.record
    probes = f", nprobe {record['nprobe']} of {record['nlist']} lists" if record.get("nlist") else ""
    print(f"{args.model} version {version}: {record['type']} index over {record['items']:,} items{probes}")
    scores, item_ids = model.top_k(args.user_ids, args.k)
    for user_id, user_scores, user_items in zip(args.user_ids, scores, item_ids):
        print(f"user {user_id}")
        for rank, (item_id, score) in enumerate(zip(user_items, user_scores), start=1):
            print(f"  {rank:3d}  {item_id}  {score:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
