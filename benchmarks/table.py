"""One markdown table, mean ± standard deviation over seeds, from several benchmark result files.

    python benchmarks/table.py benchmarks/results/omniglot_cpu_seed0.json benchmarks/results/omniglot_cpu_seed12.json

Rows with the same name (e.g. "udml" of seeds 0, 1 and 2 from different files) are pooled; a seed that
appears twice for a row (a re-run) counts once, the later file winning. Unfinished runs are left out and
counted. The spread is the sample standard deviation over seeds (0 with one seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import suite

KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--rows", nargs="*", help="rows to show, in this order (default: as found)")
    args = p.parse_args()
    by_row: dict[str, dict[int, dict]] = {}
    commits = set()
    for path in args.results:
        doc = json.loads(Path(path).read_text())
        commits.add(doc.get("commit", "?"))
        for r in doc["rows"]:
            by_row.setdefault(r["row"], {})[r["seed"]] = r
    names = args.rows or list(by_row)
    print(f"commits: {', '.join(sorted(commits))}")
    print(
        "| row | seeds | "
        + " | ".join(k.replace("recall@", "R@").replace("nmi", "NMI").replace("map@r", "MAP@R") for k in KEYS)
        + " | R@1 per seed |"
    )
    print("|---|---|" + "---|" * len(KEYS) + "---|")
    for name in names:
        runs = by_row.get(name, {})
        done = [runs[s] for s in sorted(runs) if runs[s].get("finished", True)]
        cells = []
        for k in KEYS:
            m, sd = suite.mean_spread(done, k)
            cells.append(f"{m:.1f} ± {sd:.1f}")
        per_seed = ", ".join(f"{100 * r['recall@1']:.1f}" for r in done)
        missing = len(runs) - len(done)
        seeds = f"{len(done)}" + (f" (+{missing} unfinished)" if missing else "")
        print(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {per_seed} |")


if __name__ == "__main__":
    main()
