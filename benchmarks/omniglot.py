"""Omniglot from scratch on the CPU: random start, UDML, UDML-SS and a supervised ceiling, over seeds.

    python -m benchmarks.omniglot --data ../shared/data/omniglot --seeds 0 1 2
    python -m benchmarks.omniglot --data ../shared/data/omniglot --seeds 0 --sweep lambda   # or --sweep loss
    python -m benchmarks.omniglot --data ... --sweep lambda train_split=train_val test_split=val

The last form chooses settings honestly: it trains on 25 background alphabets and evaluates on the 5 held-out
background alphabets (datasets.load_omniglot's train_val / val splits), never on images_evaluation.

Trains the `omniglot` preset (small convnet, 28 px, no pretrained weights) on images_background and tests on
the unseen alphabets of images_evaluation. "supervised" trains the same network on the true background
labels in place of the clusters: a ceiling for the unsupervised rows, not a method of udml. The random start
is the untrained network of each UDML-SS run. Final models only.
"""

from __future__ import annotations

from . import suite
from .harness import RESULTS, write_results

ROWS = {"udml": ["rotation_weight=0"], "udml_ss": [], "supervised": ["supervised=true"]}


def main(argv: list[str] | None = None) -> int:
    p = suite.parser(
        __doc__, ROWS, config="omniglot", out="runs/bench_omniglot", results=RESULTS / "omniglot.json", seeds=[0, 1, 2]
    )
    args = p.parse_args(argv)
    rows, jobs = suite.jobs_from(args, ROWS)
    suite.run(jobs)
    records = [suite.collect(j) for j in jobs]
    starts = [
        {"row": "random start", "seed": r["seed"], **r["start"]["embedding"]}
        for r in records
        if r["row"] == suite.start_row(rows) and "embedding" in r["start"]
    ]
    doc = {"config": args.config, "overrides": args.overrides, "rows": starts + records}
    doc = write_results(args.results, doc, block="flat")
    print(
        f"\nOmniglot, {args.config} {' '.join(args.overrides)} {args.sweep or ''} | seeds {args.seeds} | "
        f"{doc['card']} | commit {doc['commit']}"
    )
    print_table([("random start", starts)] + [(row, [r for r in records if r["row"] == row]) for row in rows])
    return 0


def print_table(groups: list[tuple[str, list[dict]]]) -> None:
    """One line per row: mean ± spread over its finished seeds."""
    print("| row | runs | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | wall s (mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, group in groups:
        done = [r for r in group if r.get("finished", True)]
        cells = [suite.mean_spread_cell(done, k) for k in suite.TABLE_KEYS]
        walls = [r["wall_s"] for r in done if r.get("wall_s")]
        wall = f"{sum(walls) / len(walls):.0f}" if walls else "-"
        print(f"| {name} | {len(done)} of {len(group)} | " + " | ".join(cells) + f" | {wall} |")


if __name__ == "__main__":
    raise SystemExit(main())
