"""One markdown table, mean ± standard deviation over seeds, from several benchmark result files.

    python -m benchmarks.table benchmarks/results/omniglot_cpu_seed0.json benchmarks/results/omniglot_cpu_seed12.json

Rows with the same name (e.g. "udml" of seeds 0, 1 and 2 from different files) are pooled; a seed that
appears twice for a row (a re-run) counts once, the later file winning. Unfinished runs are left out and
counted. The spread is the sample standard deviation over seeds (0 with one seed).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import suite
from .harness import base_parser

HEADS = {"nmi": "NMI", "map@r": "MAP@R"}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("results", nargs="+")
    p.add_argument("--rows", nargs="*", help="rows to show, in this order (default: as found)")
    args = p.parse_args(argv)
    by_row, commits = read(args.results)
    print(f"commits: {', '.join(sorted(commits))}")
    heads = [HEADS.get(k, k.replace("recall@", "R@")) for k in suite.TABLE_KEYS]
    print("| row | seeds | " + " | ".join(heads) + " | R@1 per seed |")
    print("|---|---|" + "---|" * len(heads) + "---|")
    for name in args.rows or list(by_row):
        print(line(name, by_row.get(name, {})))
    return 0


def read(paths: list[str]) -> tuple[dict[str, dict[int, dict]], set[str]]:
    """{row: {seed: record}} over the files (a later file wins a seed), and the commits they were made at."""
    by_row: dict[str, dict[int, dict]] = {}
    commits = set()
    for path in paths:
        doc = json.loads(Path(path).read_text())
        commits.add(doc.get("commit", "?"))
        for r in doc["rows"]:
            by_row.setdefault(r["row"], {})[r["seed"]] = r
    return by_row, commits


def line(name: str, runs: dict[int, dict]) -> str:
    done = [runs[s] for s in sorted(runs) if runs[s].get("finished", True)]
    cells = [suite.mean_spread_cell(done, k) for k in suite.TABLE_KEYS]
    per_seed = ", ".join(f"{100 * r['recall@1']:.1f}" for r in done)
    missing = len(runs) - len(done)
    seeds = f"{len(done)}" + (f" (+{missing} unfinished)" if missing else "")
    return f"| {name} | {seeds} | " + " | ".join(cells) + f" | {per_seed} |"


if __name__ == "__main__":
    raise SystemExit(main())
