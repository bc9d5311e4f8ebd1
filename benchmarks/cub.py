"""CUB-200-2011 benchmark: the pretrained start, UDML-SS, UDML (lambda = 0) and STML, final checkpoints only.

    python -m benchmarks.cub --data ../shared/data/CUB_200_2011            # docs/method.md's full schedule
    python -m benchmarks.cub --data ... --parallel --seeds 0 1 2             # both rows at once on one GPU
    python -m benchmarks.cub --data ... --sweep lambda                       # or --sweep loss (ablations)
    python -m benchmarks.cub --data ... --sweep val --parallel num_clusters=75 pseudo_epochs=260
                                                  # choose settings on the validation classes (suite.VAL_ROWS)

Each row is one `udml train` run (config cub_lite0 unless --config; by default UDML-SS and UDML, `--rows stml` for
STML); the numbers are those of the final model (no choosing on the test classes). The pretrained start is the
untrained network of the UDML-SS run: its pooled backbone features and its randomly initialised 512-d embedding
head.
"""

from __future__ import annotations

import sys

from . import suite
from .harness import RESULTS, write_results

# STML as its published recipe has it (the cub_lite0_stml preset) on top of the configuration's network and
# schedule: the same pseudo-epochs show it as many images as UDML-SS sees, in batches of 24 x 5 (in two views)
STML = [
    "method=stml",
    "optimizer=adamw",
    "lr=1e-4",
    "head_lr=1e-4",
    "weight_decay=1e-2",
    "clusters_per_batch=24",
    "images_per_cluster=5",
    "rotation_weight=0",
]
ROWS = {"udml_ss": [], "udml": ["rotation_weight=0"], "stml": STML}


def main(argv: list[str] | None = None) -> int:
    p = suite.parser(__doc__, ROWS, config="cub_lite0", out="runs/bench_cub", results=RESULTS / "cub.json", seeds=[0])
    p.add_argument("--parallel", action="store_true", help="run all rows at once (one GPU has room for both)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before unfinished runs are stopped")
    args = p.parse_args(argv)
    if not args.rows and not args.sweep:
        args.rows = ["udml_ss", "udml"]
    rows, jobs = suite.jobs_from(args, ROWS)
    suite.run(jobs, parallel=args.parallel, timeout=args.timeout)
    result = {"config": args.config, "overrides": args.overrides, "parallel": args.parallel}
    result["rows"] = records_of(jobs, rows)
    if args.sweep == "val":  # the rule written in suite.VAL_ROWS, applied to the validation numbers only
        result["choice"] = choice(result["rows"], rows)
    result = write_results(args.results, result, block="flat")
    print_table(result)
    return report_choice(result, args.timeout)


def records_of(jobs: list[dict], rows: dict[str, list[str]]) -> list[dict]:
    """Each job's record, and before the start row's the pretrained start (its untrained network's numbers)."""
    records = []
    for j in jobs:
        r = suite.collect(j)
        if j["row"] == suite.start_row(rows):
            records += [
                {"row": f"pretrained start ({kind})", "seed": j["seed"], "step": 0, **m}
                for kind, m in r["start"].items()
            ]
        records.append(r)
    return records


def choice(records: list[dict], rows: dict[str, list[str]]) -> dict | None:
    """The row the rule chooses and its settings; None when no row finished (the rule compares final models)."""
    candidates = [r for r in records if not r["row"].startswith("pretrained")]
    if not any(r.get("finished") for r in candidates):
        return None
    winner = suite.choose(candidates)
    return {"row": winner["row"], "overrides": [o for o in rows[winner["row"]] if o not in suite.VAL_SPLITS]}


def print_table(result: dict) -> None:
    settings = f"{result['config']} {' '.join(result['overrides'])}"
    print(f"\nCUB-200-2011, {settings} | {result['card']} | commit {result['commit']}")
    print("| row | seed | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        cells = [f"{100 * r[k]:.1f}" if k in r else "-" for k in suite.TABLE_KEYS]
        note = "" if r.get("finished", True) else " (unfinished: last evaluation)"
        print(f"| {r['row']}{note} | {r['seed']} | " + " | ".join(cells) + f" | {r['step']} | {r.get('wall_s', '-')} |")


def report_choice(result: dict, timeout: float | None) -> int:
    """Print the choice of a val sweep; exit code 3 when the sweep chose nothing."""
    if result.get("choice"):
        chosen = result["choice"]
        print(f"chosen on the validation classes: {chosen['row']} -> {' '.join(chosen['overrides'])}")
    elif "choice" in result:
        print(
            f"no row finished within --timeout {timeout} s, so nothing was chosen (the rule compares final "
            "models); raise the timeout, run fewer rows at once (--rows), or shorten the schedule",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
