"""Recall@1 and NMI against training steps (or wall-clock minutes), UDML-SS beside UDML, from benchmark results or
run folders.

    python -m benchmarks.plot_curves --title "Omniglot, 2 CPU cores" --out benchmarks/curves_omniglot.png \
        benchmarks/results/omniglot_cpu_seed0.json benchmarks/results/omniglot_cpu_seed12.json
    python -m benchmarks.plot_curves --title "CUB, H200" --out benchmarks/curves_cub.png \
        udml_ss=benchmarks/results/h200-2eb964b/udml_ss_seed0.metrics.jsonl \
        udml=benchmarks/results/h200-2eb964b/udml_seed0.metrics.jsonl
    python -m benchmarks.plot_curves benchmarks/results/cpu_methods_cub.json --split val --x minutes --gain \
        --rows sup_stml_net stml_fs5 udml_ss_net --out benchmarks/img/cpu_methods_cub_val.png

Inputs: results JSON files of benchmarks.omniglot or benchmarks.cub (rows "udml_ss" and "udml", every seed), or
ROW=metrics.jsonl of single runs. Several seeds: the mean line with the seeds' range shaded. ``--x minutes`` draws
against the wall-clock minutes since the command started (benchmarks.cpu_methods records them), ``--gain`` the
change from each run's first evaluation, ``--split`` keeps the records of one split. The curves are
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
COLOURS = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]


def curve_from_metrics(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [
        {"step": m["step"], "elapsed_s": m.get("elapsed_s"), "recall@1": m["recall@1"], "nmi": m["nmi"]}
        for m in lines
        if m["kind"] == "eval" and m.get("features") == "embedding"
    ]


def load(inputs: list[str], rows: list[str], split: str | None = None) -> dict[str, list[tuple[list[dict], bool]]]:
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
            if r["row"] in rows and r.get("curve") and split in (None, r.get("split")):
                curves[r["row"]].append((r["curve"], r.get("finished", True)))
    return curves


def aligned(runs, key: str, x: str, gain: bool) -> tuple[np.ndarray, np.ndarray]:
    """The runs' values of ``key`` (in %) at common x positions: the steps all runs evaluated at, or, for minutes,
    a grid up to the shortest run's end (each run interpolated linearly between its evaluations)."""
    if x == "minutes":
        pts = [[(p["elapsed_s"] / 60, 100 * p[key]) for p in c if p.get("elapsed_s") is not None] for c, _ in runs]
        if len(pts) == 1:  # one run: its own evaluations
            xs, values = np.array([a for a, _ in pts[0]]), np.array([[b for _, b in pts[0]]])
            return xs, values - values[:, :1] if gain else values
        xs = np.linspace(max(min(a for a, _ in r) for r in pts), min(max(a for a, _ in r) for r in pts), 60)
        values = np.array([np.interp(xs, [a for a, _ in r], [b for _, b in r]) for r in pts])
        firsts = np.array([[r[0][1]] for r in pts])
    else:
        xs = np.array(sorted(set.intersection(*[{p["step"] for p in c} for c, _ in runs])))
        values = np.array([[100 * next(p[key] for p in c if p["step"] == s) for s in xs] for c, _ in runs])
        firsts = np.array([[100 * c[0][key]] for c, _ in runs])
    return xs, values - firsts if gain else values


def plot(curves, title: str, out: Path, rows: list[str], labels: dict[str, str], x="step", gain=False) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in zip(axes, ("recall@1", "nmi"), ("Recall@1", "NMI")):
        for colour, row in zip(COLOURS, rows):
            runs = curves.get(row, [])
            if not runs:
                continue
            xs, values = aligned(runs, key, x, gain)
            unfinished = sum(not f for _, f in runs)
            label = f"{labels.get(row, row)} ({len(runs)} seed{'s' if len(runs) > 1 else ''}"
            label += f", {unfinished} unfinished)" if unfinished else ")"
            ax.plot(
                xs,
                values.mean(0),
                marker="o" if x == "step" or len(runs) == 1 else None,
                ms=3,
                color=colour,
                label=label,
            )
            if len(runs) > 1:
                ax.fill_between(xs, values.min(0), values.max(0), color=colour, alpha=0.2)
        if gain:
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training step" if x == "step" else "minutes since the command started")
        ax.set_ylabel(f"{name}: change from the start (points)" if gain else f"{name} (%)")
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
    p.add_argument("--x", choices=["step", "minutes"], default="step", help="the horizontal axis")
    p.add_argument("--gain", action="store_true", help="draw the change from each run's first evaluation")
    p.add_argument("--split", help="only the records of this split (benchmarks.cpu_methods: val or test)")
    args = p.parse_args(argv)
    labels = {**LABELS, **dict(x.split("=", 1) for x in args.label)}
    curves = load(args.inputs, args.rows, args.split)
    if not curves:
        raise SystemExit(f"no curves of the rows {args.rows} in the inputs")
    plot(curves, args.title, Path(args.out), args.rows, labels, args.x, args.gain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
