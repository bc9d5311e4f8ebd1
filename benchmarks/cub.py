"""CUB-200-2011 benchmark: the pretrained start, UDML-SS and UDML (lambda = 0), final checkpoints only.

    python benchmarks/cub.py --data ../shared/data/CUB_200_2011            # METHOD.md's full schedule
    python benchmarks/cub.py --data ... --parallel --seeds 0 1 2             # both rows at once on one GPU

Each row is one `udml train` run (config cub_lite0 unless --config); the numbers are those of the final
model (no choosing on the test classes). The pretrained start is the untrained network of the UDML-SS run:
its pooled backbone features and its randomly initialised 512-d embedding head.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine

ROWS = {"udml_ss": [], "udml": ["rotation_weight=0"]}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cub_lite0")
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/bench_cub", help="folder for the run folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--parallel", action="store_true", help="run all rows at once (one GPU has room for both)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before unfinished runs are stopped")
    p.add_argument("--results", default="benchmarks/results/cub.json")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every row")
    args = p.parse_args()

    jobs = []
    for seed in args.seeds:
        for row in args.rows:
            name = f"{row}_seed{seed}"
            cmd = [sys.executable, "-m", "udml", "train", "--config", args.config, "--data", args.data,
                   "--out", args.out, f"run_name={name}", f"seed={seed}", *ROWS[row], *args.overrides]
            jobs.append({"row": row, "seed": seed, "run_dir": Path(args.out) / name, "cmd": cmd})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.timeout if args.timeout else None

    def launch(job):
        job["log"] = open(job["run_dir"].with_suffix(".log"), "w")
        job["start"] = time.time()
        job["proc"] = subprocess.Popen(job["cmd"], stdout=job["log"], stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def finish(job, returncode):
        job["returncode"] = returncode
        job["wall_s"] = time.time() - job["start"]
        job["log"].close()

    def run_all(batch):
        for job in batch:
            launch(job)
        running = list(batch)
        while running:
            for job in list(running):
                if job["proc"].poll() is not None:
                    finish(job, job["proc"].returncode)
                    running.remove(job)
                elif deadline is not None and time.time() > deadline:
                    job["proc"].kill()
                    job["proc"].wait()
                    finish(job, "timeout")
                    running.remove(job)
            time.sleep(0.5)

    if args.parallel:
        run_all(jobs)
    else:
        for job in jobs:
            run_all([job])

    records = []
    for job in jobs:
        metrics = read_metrics(job["run_dir"])
        evals = [m for m in metrics if m["kind"] == "eval"]
        final = next((m for m in evals if m.get("final")), None)
        if job["row"] == "udml_ss":
            for m in evals:
                if m["round"] == 0:
                    records.append({"row": f"pretrained start ({m['features']})", "seed": job["seed"], **_pick(m)})
        records.append({"row": job["row"], "seed": job["seed"], "returncode": job["returncode"],
                        "wall_s": round(job["wall_s"], 1), "finished": final is not None,
                        "steps": max((m["step"] for m in metrics), default=0),
                        **_pick(final or (evals[-1] if evals else {})),
                        "curve": [{"step": m["step"], "recall@1": m["recall@1"], "nmi": m["nmi"]}
                                  for m in evals if m["features"] == "embedding"]})
    info = machine()
    result = {"config": args.config, "overrides": args.overrides, "parallel": args.parallel, **info, "rows": records}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))

    print(f"\nCUB-200-2011, {args.config} {' '.join(args.overrides)} | {info['card']} | commit {info['commit']}")
    print("| row | seed | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | steps | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        cells = [f"{100 * r[k]:.1f}" if k in r else "-" for k in
                 ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")]
        note = "" if r.get("finished", True) else " (unfinished: last evaluation)"
        print(f"| {r['row']}{note} | {r['seed']} | " + " | ".join(cells)
              + f" | {r.get('steps', 0)} | {r.get('wall_s', '-')} |")


def _pick(m: dict) -> dict:
    return {k: m[k] for k in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r", "step") if k in m}


if __name__ == "__main__":
    main()
