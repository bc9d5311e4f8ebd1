"""Recall@1 and NMI against training steps, UDML-SS beside UDML, from benchmark results or run folders.

    python -m benchmarks.plot_curves --title "Omniglot, 2 CPU cores" --out benchmarks/curves_omniglot.png \
        benchmarks/results/omniglot_cpu_seed0.json benchmarks/results/omniglot_cpu_seed12.json
    python -m benchmarks.plot_curves --title "CUB, H200" --out benchmarks/curves_cub.png \
        udml_ss=benchmarks/results/h200-2eb964b/udml_ss_seed0.metrics.jsonl \
        udml=benchmarks/results/h200-2eb964b/udml_seed0.metrics.jsonl

Inputs: results JSON files of benchmarks.omniglot or benchmarks.cub (rows "udml_ss" and "udml", every seed), or
ROW=metrics.jsonl of single runs. Several seeds: the mean line with the seeds' range shaded. The curves are
evaluations on the test classes during training, for the picture only: nothing is chosen from them.
"""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .harness import base_parser  # noqa: E402

LABELS = {"udml_ss": "UDML-SS", "udml": "UDML (lambda = 0)"}
COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]


def curve_from_metrics(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [
        {"step": m["step"], "recall@1": m["recall@1"], "nmi": m["nmi"]}
        for m in lines
        if m["kind"] == "eval" and m.get("features") == "embedding"
    ]


def load(inputs: list[str], rows: list[str]) -> dict[str, list[tuple[list[dict], bool]]]:
    """row -> [(curve, finished), ...] (one per seed), for the rows asked for."""
    curves = defaultdict(list)
    for item in inputs:
        if "=" in item:
            row, path = item.split("=", 1)
            curve = curve_from_metrics(Path(path))
            lines = Path(path).read_text()
            curves[row].append((curve, '"final": true' in lines))
            continue
        for r in json.loads(Path(item).read_text())["rows"]:
            if r["row"] in rows and r.get("curve"):
                curves[r["row"]].append((r["curve"], r.get("finished", True)))
    return curves


def plot(curves, title: str, out: Path, rows: list[str], labels: dict[str, str]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in zip(axes, ("recall@1", "nmi"), ("Recall@1 (%)", "NMI (%)")):
        for colour, row in zip(COLOURS, rows):
            runs = curves.get(row, [])
            if not runs:
                continue
            steps = sorted(set.intersection(*[{p["step"] for p in c} for c, _ in runs]))
            values = np.array([[100 * next(p[key] for p in c if p["step"] == s) for s in steps] for c, _ in runs])
            unfinished = sum(not f for _, f in runs)
            label = f"{labels.get(row, row)} ({len(runs)} seed{'s' if len(runs) > 1 else ''}"
            label += f", {unfinished} unfinished)" if unfinished else ")"
            ax.plot(steps, values.mean(0), marker="o", ms=3, color=colour, label=label)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", nargs="+", default=["udml_ss", "udml"], help="rows to draw, in this order")
    p.add_argument("--label", nargs="*", default=[], metavar="ROW=TEXT", help="legend text of a row")
    args = p.parse_args(argv)
    labels = {**LABELS, **dict(x.split("=", 1) for x in args.label)}
    curves = load(args.inputs, args.rows)
    if not curves:
        raise SystemExit(f"no curves of the rows {args.rows} in the inputs")
    plot(curves, args.title, Path(args.out), args.rows, labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
