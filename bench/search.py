"""Benchmark: the hybrid's EASE validation search alone (λ × β grid and α, no blend
components) on a dataset's u75 train split: wall time, anchor fits, the choices and each
step's validation NDCG@10.

Run: .venv/bin/python bench/search.py DATASET [--training JSON] [--json PATH]

``DATASET`` is ``ml-100k`` or a directory with ``interactions.csv``. ``--training`` overlays
training settings (e.g. ``'{"search_halving_above_items": 100000}'`` for the whole grid).
To time another commit's search on the same data, run this file with ``PYTHONPATH`` set to a
worktree of that commit (``git worktree add /tmp/old COMMIT``); a commit before the search
counted its fits prints ``anchor_fits`` as null.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--training", default="{}", help="training settings overlay, as JSON")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    from core.settings import load_settings
    from pipelines.split import u75_split
    from training.benchmark import load_ratings
    from training.hybrid import tune_hybrid

    overlay = json.loads(args.training)
    settings = load_settings(None, training=overlay) if overlay else load_settings(None)
    train, _ = u75_split(load_ratings(args.dataset, settings))
    item_ids = np.array(sorted(train["item_id"].unique()), dtype=object)
    start = time.perf_counter()
    choice = tune_hybrid(train, item_ids, settings.training, {}, weight_col="rating", log=lambda _: None)
    result = {
        "dataset": args.dataset,
        "items": len(item_ids),
        "seconds": round(time.perf_counter() - start, 2),
        "anchor_fits": getattr(choice, "anchor_fits", None),
        "ease_lambda": choice.ease_lambda,
        "temporal_beta": choice.temporal_beta,
        "plain_ease_lambda": choice.plain_ease_lambda,
        "input_alpha": choice.input_alpha,
        "validation": {k: round(v, 5) for k, v in choice.validation.items()},
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
