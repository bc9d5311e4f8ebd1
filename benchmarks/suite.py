"""Run rows of `udml train` (one subprocess each) and collect their final metrics from metrics.jsonl."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .harness import base_parser, python_env

METRIC_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "recall@10", "recall@100", "recall@1000", "nmi", "map@r")
TABLE_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")  # the columns of the printed tables


def job(row: str, seed: int, config: str, out: str, overrides: list[str]) -> dict:
    name = f"{row}_seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "udml",
        "train",
        "--config",
        config,
        "--out",
        out,
        f"run_name={name}",
        f"seed={seed}",
        *overrides,
    ]
    return {"row": row, "seed": seed, "run_dir": Path(out) / name, "cmd": cmd}


def log_path(j: dict) -> Path:
    return j["run_dir"].parent / (j["run_dir"].name + ".log")  # not with_suffix: "lambda_0.05_seed0"


def run(jobs: list[dict], parallel: bool = False, timeout: float | None = None) -> None:
    """Run the jobs (all at once or one after another); each gets returncode and wall_s."""
    deadline = time.time() + timeout if timeout else None
    for j in jobs:
        j["run_dir"].parent.mkdir(parents=True, exist_ok=True)
    for group in [jobs] if parallel else [[j] for j in jobs]:
        for j in group:
            start(j)
        wait(group, deadline)
        for j in group:
            if j["returncode"] != 0:  # say so at once; the table marks the row unfinished
                tail = log_path(j).read_text().splitlines()[-5:]
                print(f"{j['run_dir'].name}: exit {j['returncode']}\n  " + "\n  ".join(tail), flush=True)


def start(j: dict) -> None:
    """The job's `udml train` in its own process, its output into the job's log file."""
    j["log"] = open(log_path(j), "w")  # closed by wait()
    j["start"] = time.time()
    env = {**python_env(), "PYTHONUNBUFFERED": "1"}
    j["proc"] = subprocess.Popen(j["cmd"], stdout=j["log"], stderr=subprocess.STDOUT, env=env)


def wait(group: list[dict], deadline: float | None) -> None:
    """Until every job of the group has ended, or was stopped at the deadline (returncode "timeout")."""
    running = list(group)
    while running:
        for j in list(running):
            code = j["proc"].poll()
            if code is None and deadline is not None and time.time() > deadline:
                j["proc"].kill()
                j["proc"].wait()
                code = "timeout"
            if code is not None:
                j["returncode"], j["wall_s"] = code, round(time.time() - j["start"], 1)
                j["log"].close()
                running.remove(j)
        time.sleep(0.5)


LAMBDAS = (0, 0.05, 0.1, 0.5, 1)

# Settings to choose between on the validation classes (train on train_val, evaluate on val; the test classes
# are not seen). Rule, fixed before any of these ran: the row with the highest final Recall@1 on val wins; rows
# within 0.5 points of it are decided by NMI. UDML (lambda = 0) then runs with the winner's other settings.
VAL_ROWS = {
    "paper": [],  # docs/method.md: heads at the backbone's lr
    "head_lr": ["head_lr=1e-3"],  # the random heads at 100x
    "head_lr_lambda0.5": ["head_lr=1e-3", "rotation_weight=0.5"],
    "head_lr_clamped": ["head_lr=1e-3", "crop_rule=clamped"],  # crops clamped to the image, not redrawn
    "head_lr_fresh": ["head_lr=1e-3", "recluster_init=fresh"],  # k-means++ at every clustering, no warm start
    "head_lr_2k": ["head_lr=1e-3", "num_clusters=150"],  # twice as many clusters as val-free classes
}
VAL_SPLITS = ["train_split=train_val", "test_split=val"]


def sweep(kind: str) -> dict[str, list[str]]:
    """Rows of an ablation: row name -> overrides. "lambda": the rotation weight; "loss": every metric loss
    udml offers (with the preset's lambda); "val": VAL_ROWS on the validation split (for choosing settings)."""
    if kind == "lambda":
        return {f"lambda_{v:g}": [f"rotation_weight={v}"] for v in LAMBDAS}
    if kind == "loss":
        from udml.losses import LOSSES

        return {f"loss_{name}": [f"loss={name}"] for name in LOSSES}
    if kind == "val":
        return {name: VAL_SPLITS + overrides for name, overrides in VAL_ROWS.items()}
    raise ValueError(f"unknown sweep {kind!r}: lambda, loss or val")


def choose(records: list[dict], margin: float = 0.005) -> dict:
    """The VAL_ROWS rule: highest final Recall@1; rows within ``margin`` of it are decided by NMI. Unfinished
    rows do not take part."""
    done = [r for r in records if r.get("finished") and "recall@1" in r]
    if not done:
        raise ValueError("no finished row to choose from")
    best = max(r["recall@1"] for r in done)
    return max((r for r in done if r["recall@1"] >= best - margin), key=lambda r: r.get("nmi", 0.0))


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def pick(m: dict) -> dict:
    return {k: m[k] for k in METRIC_KEYS if k in m}


def collect(j: dict) -> dict:
    """The row's final metrics (or, for an unfinished run, its last evaluation, flagged) and its curve."""
    ms = metrics(j["run_dir"])
    evals = [m for m in ms if m["kind"] == "eval" and m.get("features") == "embedding"]
    final = next((m for m in evals if m.get("final")), None)
    last = final or (evals[-1] if evals else {})
    return {
        "row": j["row"],
        "seed": j["seed"],
        "returncode": j.get("returncode"),
        "wall_s": j.get("wall_s"),
        "finished": final is not None,
        "step": last.get("step", 0),
        **pick(last),
        "start": {kind: pick(m) for m in ms if m["kind"] == "eval" and m["round"] == 0 for kind in [m["features"]]},
        "curve": [{"step": m["step"], **pick(m)} for m in evals],
    }


def mean_spread(records: list[dict], key: str) -> tuple[float, float]:
    values = [100 * r[key] for r in records if key in r]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_spread_cell(records: list[dict], key: str) -> str:
    """A table cell: the mean ± the sample standard deviation over the records, in percent."""
    m, sd = mean_spread(records, key)
    return f"{m:.1f} ± {sd:.1f}"


def select(rows: dict[str, list[str]], names: list[str] | None) -> dict[str, list[str]]:
    unknown = set(names or []) - set(rows)
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(sorted(unknown))}; the rows are {', '.join(rows)}")
    return {r: rows[r] for r in names} if names else dict(rows)


def parser(doc: str, rows: dict[str, list[str]], *, config: str, out: str, results: str | Path, seeds: list[int]):
    """The command line every row benchmark shares (omniglot, cub)."""
    p = base_parser(doc, results=results, out=out, seeds=seeds, overrides="extra key=value overrides for every row")
    p.add_argument("--config", default=config)
    p.add_argument("--data", required=True)
    p.add_argument("--rows", nargs="+", help=f"a subset of the rows ({', '.join(rows)}) or of the sweep's rows")
    p.add_argument(
        "--sweep",
        choices=["lambda", "loss", "val"],
        help="instead of the rows: UDML-SS at each "
        f"lambda ({', '.join(f'{v:g}' for v in LAMBDAS)}) or with each metric loss (ablations on the test "
        "classes, not a way to choose settings), or the candidate settings of VAL_ROWS on the "
        "validation split (train_val / val), which is where settings are chosen",
    )
    return p


def jobs_from(args, rows: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[dict]]:
    """(the rows to run, one job per seed and row) from the options of parser()."""
    rows = select(sweep(args.sweep) if args.sweep else rows, args.rows)
    # a row's own settings come last, so that they win over the overrides given for every row
    jobs = [
        job(row, seed, args.config, args.out, [f"data_root={args.data}", *args.overrides, *rows[row]])
        for seed in args.seeds
        for row in rows
    ]
    return rows, jobs


def start_row(rows) -> str:
    """The row whose untrained network gives the "start" numbers (UDML-SS when it runs)."""
    return "udml_ss" if "udml_ss" in rows else next(iter(rows))
