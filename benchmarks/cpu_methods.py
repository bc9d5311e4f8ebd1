"""Training methods on a CPU against their supervised ceiling (issue #28): CUB `val`, gain against minutes.

    python -m benchmarks.cpu_methods --data ../shared/data/CUB_200_2011 --rows sup_fs5 stml_fs5 --minutes 20
    python -m benchmarks.cpu_methods --data ... --rows stml_fs5 --seeds 0 1 2 --minutes 20 --split test

Each row is one `udml train --config folder_cpu` with the row's overrides, trained on CUB's `train_val` split (75
training classes, no labels) and evaluated on `val` (the other 25 training classes), or with ``--split test`` on
the protocol's split (classes 1-100 against 101-200). Training runs until the time budget (``--minutes``, the
whole command) ends it, with an evaluation after every round, so that each row gives a curve of the gain against
wall-clock minutes; the numbers reported are the final model's, the curve's points are read at 3, 10 and 20
minutes (the last evaluation at or before each). ``sup_*`` rows train on the true labels: not a method but the
ceiling of that configuration and budget. Rows run one at a time; results are merged into ``--results`` by row,
seed and split, so a queue of invocations fills one file.
"""

from __future__ import annotations

from pathlib import Path

from . import cub, suite
from .harness import RESULTS, base_parser, read_results, stamped, write_results

# The settings STML runs with on a CPU: its published recipe as benchmarks.cub has it (AdamW, lr 1e-4, weight decay
# 1e-2 on the trained stages and the head alike, batches of 24 neighbourhoods x 5 images in two views, no rotation
# task), plus the first 5 stages' outputs of 4 training views of every image computed once (a step runs only stages
# 6-7) and no wide head (the embedding is the pooled features, so the teacher's targets start as the pretrained
# network's own geometry).
STML = [*cub.STML, "frozen_views=4", "method_params={wide_dim: null}"]
# The same network, optimiser and cached views on the true labels (P x M batches of classes, multi-similarity).
STML_NET = [o for o in STML if o.split("=")[0] in ("optimizer", "lr", "head_lr", "weight_decay", "frozen_views")]

ROWS = {
    # ceilings: the true labels of the training classes
    "sup_fs5": ["supervised=true"],  # folder_cpu as it is: Lite0, stages 6-7 trained, lr 3e-5
    "sup_fs4": ["supervised=true", "freeze_stages=4"],  # stages 5-7 trained
    "sup_stml_net": ["supervised=true", *STML_NET],  # the STML rows' configuration
    "sup_stml_net_fs4": ["supervised=true", *STML_NET, "freeze_stages=4"],
    # methods
    "folder_cpu": ["pseudo_epochs=11"],  # the folder_cpu preset as it is: its own 60 steps (UDML-SS)
    "folder_cpu_fs4": ["pseudo_epochs=11", "freeze_stages=4"],  # the same with stages 5-7 trained
    # folder_cpu_fs4 with its pseudo-labels from features averaged with their 8 nearest neighbours first
    "folder_cpu_fs4_tn8": ["pseudo_epochs=11", "freeze_stages=4", "target_neighbours=8"],
    "folder_cpu_fs4_tn16": ["pseudo_epochs=11", "freeze_stages=4", "target_neighbours=16"],
    "folder_cpu_fs4_2r": ["pseudo_epochs=22", "freeze_stages=4"],  # folder_cpu_fs4 for two rounds (120 steps)
    "udml_ss": [],  # the folder_cpu preset (UDML-SS), trained for the whole budget
    "udml_ss_net_fs4": [*STML_NET, "freeze_stages=4"],
    "udml_ss_net": STML_NET,  # UDML-SS in the STML rows' configuration: pseudo-labels where sup_stml_net has labels
    "stml_fs5": STML,
    "stml_fs4": [*STML, "freeze_stages=4"],
    # the targets from features averaged with their 8 nearest neighbours first (target_neighbours)
    "udml_ss_net_tn8": [*STML_NET, "target_neighbours=8"],
    "stml_fs5_tn8": [*STML, "target_neighbours=8"],
}

MINUTES = (3, 10, 20)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(
        __doc__,
        results=RESULTS / "cpu_methods_cub.json",
        out="runs/bench_cpu_methods",
        seeds=[0],
        overrides="extra key=value overrides for every row (after the row's own)",
    )
    p.add_argument("--data", required=True)
    p.add_argument("--rows", nargs="+", required=True, help=f"rows: {', '.join(ROWS)}")
    p.add_argument("--minutes", type=float, default=20, help="time budget of the whole command")
    p.add_argument("--split", choices=["val", "test"], default="val")
    args = p.parse_args(argv)
    rows = suite.select(ROWS, args.rows)
    split = ["train_split=train_val", "test_split=val"] if args.split == "val" else []
    common = [
        "dataset=cub",
        f"data_root={args.data}",
        *split,
        "pictures=false",
        "eval_every=1",
        f"time_budget={args.minutes:g}m",
        "pseudo_epochs=2200",  # the budget, not the schedule, ends training
        "recluster_every=11",
    ]
    for seed in args.seeds:
        for row, overrides in rows.items():
            name = f"{row}_{args.split}_{args.minutes:g}m"
            j = suite.job(name, seed, "folder_cpu", args.out, [*common, *overrides, *args.overrides])
            suite.run([j])
            record = summarise(suite.collect(j), j)
            record.update(row=row, split=args.split, minutes=args.minutes, overrides=[*overrides, *args.overrides])
            print(line(save(Path(args.results), record)), flush=True)
    return 0


def summarise(r: dict, j: dict) -> dict:
    """The row's start, final and curve, the curve read at MINUTES, and its diagnostics (the round targets'
    agreement with the true training classes, seconds per step)."""
    ms = suite.metrics(j["run_dir"])
    evals = [m for m in ms if m["kind"] == "eval" and m.get("features") == "embedding"]
    start = next((m for m in evals if m["round"] == 0), {})
    curve = [{"step": m["step"], "elapsed_s": m.get("elapsed_s"), **suite.pick(m)} for m in evals]
    at = {}
    for minutes in MINUTES:
        seen = [c for c in curve if c["elapsed_s"] is not None and c["elapsed_s"] <= 60 * minutes]
        # a run budgeted for these minutes ends a little before them: its last evaluation is read there
        if seen and minutes * 60 <= (r.get("wall_s") or 0) + 60:
            at[f"{minutes}m"] = {k: v for k, v in seen[-1].items() if k not in ("elapsed_s",)}
    train = [m for m in ms if m["kind"] == "train"]
    steps = sum(m["iterations"] for m in train)  # the planned iterations; the last round may stop early
    seconds = sum(m["seconds"] for m in train)
    targets = [m for m in ms if m["kind"] in ("cluster", "neighbours")]
    return {
        **{k: r[k] for k in ("seed", "returncode", "wall_s", "finished", "step")},
        "start": suite.pick(start),
        "final": suite.pick(evals[-1]) if r["finished"] else {},
        "curve": curve,
        "at": at,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, r["step"]), 3) if r["step"] else None,
        "planned_steps": steps,
        "targets": [{k: v for k, v in m.items() if k not in ("kind",)} for m in targets],
        "cmd": " ".join(j["cmd"][1:]),
    }


def save(path: Path, record: dict) -> dict:
    """Merge the record, stamped with the machine block, into the results file by row, seed, split and minutes."""
    record = stamped(record)
    data = read_results(path, {"rows": []})
    key = (record["row"], record["seed"], record["split"], record["minutes"])
    data["rows"] = [r for r in data["rows"] if (r["row"], r["seed"], r["split"], r["minutes"]) != key] + [record]
    write_results(path, data, block=None, indent=1)
    return record


def line(r: dict) -> str:
    if not r["final"]:
        return f"{r['row']} seed {r['seed']}: unfinished (exit {r['returncode']})"
    d = {k: 100 * (r["final"][k] - r["start"][k]) for k in ("recall@1", "nmi", "map@r")}
    at = "  ".join(f"{m}: {100 * (v['recall@1'] - r['start']['recall@1']):+.2f}" for m, v in r["at"].items())
    return (
        f"{r['row']} seed {r['seed']} ({r['split']}, {r['step']} steps, {r['wall_s']:.0f} s): R@1 "
        f"{100 * r['start']['recall@1']:.2f} -> {100 * r['final']['recall@1']:.2f} ({d['recall@1']:+.2f}), NMI "
        f"{d['nmi']:+.2f}, MAP@R {d['map@r']:+.2f} | R@1 gain at {at}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
