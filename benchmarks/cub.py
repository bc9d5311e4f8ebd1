"""CUB-200-2011 benchmark: the pretrained start, UDML-SS and UDML (lambda = 0), final checkpoints only.

    python benchmarks/cub.py --data ../shared/data/CUB_200_2011            # docs/method.md's full schedule
    python benchmarks/cub.py --data ... --parallel --seeds 0 1 2             # both rows at once on one GPU
    python benchmarks/cub.py --data ... --sweep lambda                       # or --sweep loss (ablations)
    python benchmarks/cub.py --data ... --sweep val --parallel num_clusters=75 pseudo_epochs=260
                                             # choose settings on the validation classes (suite.VAL_ROWS)

Each row is one `udml train` run (config cub_lite0 unless --config); the numbers are those of the final
model (no choosing on the test classes). The pretrained start is the untrained network of the UDML-SS run:
its pooled backbone features and its randomly initialised 512-d embedding head.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import suite
from common import machine

ROWS = {"udml_ss": [], "udml": ["rotation_weight=0"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cub_lite0")
    suite.add_arguments(p, ROWS, out="runs/bench_cub", results="benchmarks/results/cub.json", seeds=[0])
    p.add_argument("--parallel", action="store_true", help="run all rows at once (one GPU has room for both)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before unfinished runs are stopped")
    args = p.parse_args()
    rows, jobs = suite.jobs_from(args, ROWS)
    suite.run(jobs, parallel=args.parallel, timeout=args.timeout)
    records = []
    for j in jobs:
        r = suite.collect(j)
        if j["row"] == suite.start_row(rows):
            records += [
                {"row": f"pretrained start ({kind})", "seed": j["seed"], "step": 0, **m}
                for kind, m in r["start"].items()
            ]
        records.append(r)
    info = machine()
    result = {"config": args.config, "overrides": args.overrides, "parallel": args.parallel, **info, "rows": records}
    if args.sweep == "val":  # the rule written in suite.VAL_ROWS, applied to the validation numbers only
        candidates = [r for r in records if not r["row"].startswith("pretrained")]
        if any(r.get("finished") for r in candidates):
            winner = suite.choose(candidates)
            result["choice"] = {
                "row": winner["row"],
                "overrides": [o for o in rows[winner["row"]] if o not in suite.VAL_SPLITS],
            }
        else:  # the rule compares final models only: nothing to choose, and the results are still written
            result["choice"] = None
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))

    print(f"\nCUB-200-2011, {args.config} {' '.join(args.overrides)} | {info['card']} | commit {info['commit']}")
    print("| row | seed | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        cells = [
            f"{100 * r[k]:.1f}" if k in r else "-"
            for k in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")
        ]
        note = "" if r.get("finished", True) else " (unfinished: last evaluation)"
        print(f"| {r['row']}{note} | {r['seed']} | " + " | ".join(cells) + f" | {r['step']} | {r.get('wall_s', '-')} |")
    if result.get("choice"):
        print(
            f"chosen on the validation classes: {result['choice']['row']} -> {' '.join(result['choice']['overrides'])}"
        )
    elif "choice" in result:
        print(
            f"no row finished within --timeout {args.timeout} s, so nothing was chosen (the rule compares final "
            "models); raise the timeout, run fewer rows at once (--rows), or shorten the schedule",
            file=sys.stderr,
        )
        sys.exit(3)


if __name__ == "__main__":
    main()
