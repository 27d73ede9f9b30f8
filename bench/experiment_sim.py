"""Online experiments under the behaviour simulator: over N seeds, how often A/B and
team-draft interleaving name the truly better model, how often the worse one (the false
decision rate), and how many users each needs.

    .venv/bin/python bench/experiment_sim.py --seeds 20 --out out/experiment-sim.json

One synthetic platform (``hyperrec generate``: 30,000 events, 3,000 users, 300 items, seed 1);
each pair of models runs in both directions (the better model as challenger, then as
champion), 50/50 A/B share, the report read after every 50 users (the mSPRT is valid under
such peeking), up to every user once, ``--min-impressions`` per arm (A/B) or decisive
impressions (interleaving) before any verdict. Prints one line per pair and design and writes
the whole result as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/ holds modules named like the packages (bench/feature_store.py): the repository root
# goes first on the path instead of this folder.
_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from core.datasets.synthetic import generate  # noqa: E402
from core.settings import load_settings  # noqa: E402
from hyperrec.simulate import GroundTruth, fit_bundle, run_experiment  # noqa: E402


def expected_ctr(bundle_dir: Path, truth: GroundTruth, k: int = 10) -> float:
    """The model's true CTR@k under the simulator's click model: the mean over every user of
    P(at least one click on its top k) (what makes one model "truly better")."""
    import numpy as np

    from core.settings import ServingSettings
    from hyperrec.simulate import ClickModel
    from serving.recommender import RecommendationRequest, ServedModel
    from training.bundle import load_bundle

    served, clicks = ServedModel(load_bundle(bundle_dir), bundle_dir, ServingSettings()), ClickModel()
    ctr = []
    for user in truth.user_ids:
        items = [it.item_id for it in served.recommend(RecommendationRequest(user, k), []).items]
        ctr.append(1.0 - float(np.prod(1.0 - clicks.probabilities(truth.affinity(user, items)))))
    return float(np.mean(ctr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--pairs", default="ease>popularity,item_knn>ease", help="better>worse,...")
    parser.add_argument("--designs", default="ab,interleaving")
    parser.add_argument("--step", type=int, default=50)
    parser.add_argument("--min-impressions", type=int, default=100, help="experiment.min_impressions")
    parser.add_argument("--alpha", type=float, default=0.05, help="experiment.alpha")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="exp-sim-") as tmp:
        root = Path(tmp)
        dataset = generate(root / "dataset", events=30_000, users=3_000, items=300, seed=1, progress=False).root
        truth = GroundTruth.load(dataset)
        settings = load_settings(
            home=str(root / "home"), experiment={"min_impressions": args.min_impressions, "alpha": args.alpha}
        )
        bundles: dict[str, Path] = {}
        results = []
        for pair in args.pairs.split(","):
            better, worse = pair.split(">")
            for name in (better, worse):
                if name not in bundles:
                    bundles[name] = fit_bundle(dataset, name, root / name, name.replace("_", "-"))
            truth_ctr = {name: expected_ctr(bundles[name], truth) for name in (better, worse)}
            print(f"true CTR@10 under the click model: {json.dumps(truth_ctr)}", flush=True)
            if truth_ctr[better] <= truth_ctr[worse]:
                raise SystemExit(f"{better} is not truly better than {worse}: {truth_ctr}")
            for design in args.designs.split(","):
                row: dict = {"better": better, "worse": worse, "design": design, "true_ctr": truth_ctr, "runs": []}
                start = time.perf_counter()
                for seed in range(args.seeds):
                    for champion, challenger, truly in ((worse, better, "better"), (better, worse, "worse")):
                        result = run_experiment(
                            settings,
                            champion_dir=bundles[champion],
                            challenger_dir=bundles[challenger],
                            truth=truth,
                            experiment_id=f"b-{design}-{champion}-{challenger}-{seed}".replace("_", "-"),
                            design=design,
                            seed=seed,
                            step=args.step,
                        )
                        row["runs"].append(
                            {"seed": seed, "truth": truly, "verdict": result["verdict"], "users": result["users"]}
                        )
                runs = row["runs"]
                decided = [r for r in runs if r["verdict"] != "unknown"]
                row["correct"] = sum(r["verdict"] == r["truth"] for r in runs)
                row["false_decisions"] = sum(r["verdict"] not in ("unknown", r["truth"]) for r in runs)
                row["undecided"] = len(runs) - len(decided)
                row["false_decision_rate"] = row["false_decisions"] / len(runs)
                users = [r["users"] for r in decided] or [0]
                row["users_median"] = statistics.median(users)
                row["users_mean"] = statistics.fmean(users)
                row["seconds"] = round(time.perf_counter() - start, 1)
                results.append(row)
                print(
                    f"{better} vs {worse} {design:<12} runs {len(runs)} correct {row['correct']} "
                    f"false {row['false_decisions']} undecided {row['undecided']} "
                    f"users median {row['users_median']} mean {row['users_mean']:.0f} ({row['seconds']} s)",
                    flush=True,
                )
        for pair in {(r["better"], r["worse"]) for r in results}:
            by = {r["design"]: r for r in results if (r["better"], r["worse"]) == pair}
            if "ab" in by and "interleaving" in by and by["interleaving"]["users_mean"]:
                ratio = by["ab"]["users_mean"] / by["interleaving"]["users_mean"]
                print(f"{pair[0]} vs {pair[1]}: A/B needs {ratio:.1f}x the users of interleaving", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
