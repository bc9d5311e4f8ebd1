"""Omniglot from scratch on the CPU: random start, UDML, UDML-SS and a supervised ceiling, over seeds.

    python benchmarks/omniglot.py --data ../shared/data/omniglot --seeds 0 1 2
    python benchmarks/omniglot.py --data ../shared/data/omniglot --seeds 0 --sweep lambda   # or --sweep loss
    python benchmarks/omniglot.py --data ... --sweep lambda train_split=train_val test_split=val

The last form chooses settings honestly: it trains on 25 background alphabets and evaluates on the 5 held-out
background alphabets (datasets.load_omniglot's train_val / val splits), never on images_evaluation.

Trains the `omniglot` preset (small convnet, 28 px, no pretrained weights) on images_background and tests on
the unseen alphabets of images_evaluation. "supervised" trains the same network on the true background
labels in place of the clusters: a ceiling for the unsupervised rows, not a method of udml. The random start
is the untrained network of each UDML-SS run. Final models only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import suite
from common import machine

ROWS = {"udml": ["rotation_weight=0"], "udml_ss": [], "supervised": ["supervised=true"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="omniglot")
    suite.add_arguments(p, ROWS, out="runs/bench_omniglot", results="benchmarks/results/omniglot.json", seeds=[0, 1, 2])
    args = p.parse_args()
    rows, jobs = suite.jobs_from(args, ROWS)
    suite.run(jobs)
    records = [suite.collect(j) for j in jobs]
    starts = [
        {"row": "random start", "seed": r["seed"], **r["start"]["embedding"]}
        for r in records
        if r["row"] == suite.start_row(rows) and "embedding" in r["start"]
    ]
    info = machine()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(
        json.dumps({"config": args.config, "overrides": args.overrides, **info, "rows": starts + records}, indent=2)
    )

    print(
        f"\nOmniglot, {args.config} {' '.join(args.overrides)} {args.sweep or ''} | seeds {args.seeds} | "
        f"{info['card']} | "
        f"commit {info['commit']}"
    )
    print("| row | runs | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | wall s (mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, group in [("random start", starts)] + [(row, [r for r in records if r["row"] == row]) for row in rows]:
        done = [r for r in group if r.get("finished", True)]
        cells = []
        for k in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r"):
            m, sd = suite.mean_spread(done, k)
            cells.append(f"{m:.1f} ± {sd:.1f}")
        walls = [r["wall_s"] for r in done if r.get("wall_s")]
        wall = f"{sum(walls) / len(walls):.0f}" if walls else "-"
        print(f"| {name} | {len(done)} of {len(group)} | " + " | ".join(cells) + f" | {wall} |")


if __name__ == "__main__":
    main()
