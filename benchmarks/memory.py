"""Peak memory of ``udml train`` on a CPU against the number of training images (issue #10, item 7).

    python -m benchmarks.memory --label after                           # N = 500 1500 3000 5864, no test split
    python -m benchmarks.memory --label after_cub --sizes --cub         # CUB: 5,864 training + 5,924 test images

Every run is ``udml train --data DIR`` (the ``folder`` preset: EfficientNet-Lite0, 224 px crops, resize 253) in
a fresh subprocess on the CPU, with a tiny schedule: one clustering round of one training step
(``pseudo_epochs=1 recluster_every=1 epoch_images_per_cluster=1 device=cpu``, then ``--overrides``); the
training step's memory does not depend on N, and a second step peaks no higher than the first. DIR is a
temporary folder of symlinks into CUB-200-2011:

- ``--sizes N ...`` (default 500 1500 3000 5864): N of CUB's 5,864 training images (classes 1-100), evenly
  spaced in CUB's order; no test split, so only the training images grow with N. No pictures
  (``pictures=false``: an evaluation pass and a t-SNE, measured on the CUB run) to save time.
- ``--cub`` (off by default): all 5,864 training images, with ``test_root`` a folder of CUB's 5,924 test
  images (classes 101-200, one sub-folder per class): start and final evaluations, and the pictures.

What is recorded, per run:

- ``peak_rss_mb``: the main process's peak resident set (what ``top``/``/usr/bin/time -v`` report), the
  largest of the phases' high-water marks below; ``ru_maxrss_mb``: the child's rusage from wait4 (the largest
  of its processes' high-water marks since their last reset: a cross-check, no better than peak_rss_mb);
  ``cpu_s``, ``user_s``, ``sys_s``: CPU time of the child and its workers (less sensitive than ``wall_s`` to
  other jobs on the machine).
- ``peak_tree_pss_mb``: the largest proportional set size (PSS) of the child and its DataLoader worker
  processes together, sampled every ``--interval`` seconds: the memory the run really occupies, with pages
  shared between the processes counted once (the sum of the RSS would count them once per process);
  ``peak_tree_rss_mb`` that sum of RSS, for comparison.
- ``phases``: the child wraps udml's functions (decoding: ``ImageDataset.__init__``; stacking:
  ``stack``; the model; evaluations; clustering; training rounds; pictures) and records, for each call, the
  main process's resident set before and after and its high-water mark during the call (reset through
  ``/proc/self/clear_refs`` at the start of every phase), plus the bytes it produced (decoded uint8 images,
  stacked tensors). ``(between)`` rows are the high-water marks of the stretches between two phases
  (imports, DataLoader start-up, writing files).
- ``decoded_mb``: the decoded uint8 images held by the data sets (their cache), ``stacked_mb``: the stacked
  test-transform tensors, both as reported by the phases.

Writes ``benchmarks/results/memory_cpu_<label>.json`` and prints a table. Linux only (/proc).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .harness import (
    RESULTS,
    ROOT,
    base_parser,
    command_line,
    link_photos,
    mb,
    python_env,
    python_module,
    reset_peak,
    status_kb,
    write_results,
)

DEFAULT_CUB = ROOT.parent / "shared" / "data" / "CUB_200_2011"
SHORT_SCHEDULE = ["pseudo_epochs=1", "recluster_every=1", "epoch_images_per_cluster=1", "device=cpu"]


# ---------------------------------------------------------------------------------------------------------------
# a process tree, sampled (also used by benchmarks.store)


def pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (threads' children files list the child processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class TreeSampler:
    """Samples a process and its descendants every ``interval`` seconds in a thread, from ``start()`` to
    ``stop()``: ``rows`` of (t_s since ``t_start``, main RSS MB, summed RSS MB, summed PSS MB, processes)."""

    COLUMNS = ["t_s", "main_rss_mb", "tree_rss_mb", "tree_pss_mb", "processes"]

    def __init__(self, pid: int, interval: float, t_start: float | None = None):
        self.pid, self.interval = pid, interval
        self.t_start = time.time() if t_start is None else t_start
        self.rows: list[tuple] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            pids = descendants(self.pid)
            rss = [status_kb("VmRSS", p) for p in pids]
            pss = [pss_kb(p) for p in pids]
            self.rows.append(
                (
                    round(time.time() - self.t_start, 2),
                    mb(rss[0]),
                    mb(sum(r or 0 for r in rss)),
                    mb(sum(p or 0 for p in pss)),
                    len(pids),
                )
            )
            self._done.wait(self.interval)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple]:
        self._done.set()
        self._thread.join()
        return self.rows

    def peak(self, column: str, t0: float = float("-inf"), t1: float = float("inf")):
        """Largest value of ``column`` among the samples taken between t0 and t1 (seconds since t_start)."""
        k = self.COLUMNS.index(column)
        return max((r[k] for r in self.rows if t0 <= r[0] <= t1 and r[k] is not None), default=None)


@dataclass
class Sampled:
    """A child process that ran: its output, its own resource usage (wait4), its process tree's samples."""

    output: str
    usage: resource.struct_rusage
    sampler: TreeSampler
    t_start: float
    wall_s: float


def run_sampled(cmd: list[str], interval: float, echo: Callable[[str], None] | None = None) -> Sampled:
    """``cmd`` in a child process (PYTHONPATH: harness.python_env), its process tree sampled every ``interval``
    seconds; each line of its output is passed to ``echo`` as it comes. Raises if the child fails."""
    t_start = time.time()
    proc = subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, interval, t_start).start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo is not None:
            echo(line)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource usage
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    sampler.stop()
    if rc != 0:
        print("".join(lines)[-4000:], file=sys.stderr)
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}")
    return Sampled("".join(lines), usage, sampler, t_start, time.time() - t_start)


# ---------------------------------------------------------------------------------------------------------------
# the child: udml train with probes


def nbytes(obj) -> int:
    """Bytes of image data held by a tensor, an array, a list of them, or a data set's cache."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    for attr in ("arrays", "crops"):  # ImageDataset caches
        if getattr(obj, attr, None) is not None:
            return nbytes(getattr(obj, attr))
    return 0


class Probes:
    """Phase records of the main process, appended to a JSON-lines file as they end."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # open for the life of the process
        self.can_reset = reset_peak()
        self.depth = 0
        self.evaluations = 0
        self.last = "start"
        atexit.register(self._between, "exit")

    def _write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")

    def _between(self, until: str) -> None:
        self._write(
            phase="(between)",
            after=self.last,
            before=until,
            t=time.time(),
            peak_mb=mb(status_kb("VmHWM")),
            rss_mb=mb(status_kb("VmRSS")),
        )

    def wrap(self, owner, attr: str, phase: str, produced=None) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            print(f"memory.py: no {owner.__name__}.{attr} to probe (phase {phase!r} not recorded)", file=sys.stderr)
            return

        @functools.wraps(fn)
        def probed(*args, **kwargs):
            if self.depth:  # a phase inside a phase belongs to the outer one
                return fn(*args, **kwargs)
            name = self._name(phase)
            self._between(name)
            reset_peak()
            t0, rss0 = time.time(), status_kb("VmRSS")
            self.depth += 1
            try:
                result = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            made = produced(args, result) if produced else None
            self._write(
                phase=name,
                t0=t0,
                t=time.time(),
                rss_before_mb=mb(rss0),
                rss_mb=mb(status_kb("VmRSS")),
                peak_mb=mb(status_kb("VmHWM")),
                produced_mb=None if made is None else round(made / 2**20, 1),
            )
            self.last = name
            reset_peak()
            return result

        setattr(owner, attr, probed)

    def _name(self, phase: str) -> str:
        if phase != "evaluation":
            return phase
        self.evaluations += 1
        return "start evaluation" if self.evaluations == 1 else "evaluation"


def child(marks: str, argv: list[str]) -> int:
    import udml.data
    import udml.pseudolabels
    import udml.session
    import udml.training
    from udml.cli import main

    probes = Probes(marks)
    probes.wrap(udml.session, "model_from_config", "model")
    probes.wrap(udml.data.ImageDataset, "__init__", "decode", lambda args, _: nbytes(args[0]))
    probes.wrap(udml.session, "stack", "stack", lambda _, result: nbytes(result))
    probes.wrap(udml.training, "evaluate_model", "evaluation")
    probes.wrap(udml.pseudolabels, "cluster", "clustering")  # UDML-SS's round targets import it when they run
    probes.wrap(udml.training, "train_round", "training steps")
    probes.wrap(udml.training, "write_run_pictures", "pictures")
    return main(argv)


# ---------------------------------------------------------------------------------------------------------------
# the parent: runs, sampling, tables


def link_folder(cub_root: Path, split: str, n: int | None, where: Path) -> Path:
    """A folder of symlinks to CUB images: ``n`` of the training images (classes 1-100), evenly spaced in CUB's
    order, flat; or (``n`` None) all images of ``split``, the test split in one sub-folder per class."""
    import numpy as np

    from udml.datasets import load_cub

    images = load_cub(cub_root, split).images
    n = len(images) if n is None else n
    if n > len(images):
        raise ValueError(f"CUB has {len(images)} {split} images, not {n}")
    picks = np.unique(np.linspace(0, len(images) - 1, n).round().astype(int))
    return link_photos([images[i] for i in picks], where / f"cub_{split}{n}", flat=split != "test")


def run(argv: list[str], interval: float, work: Path) -> dict:
    """``udml train argv`` in a child process: its phases, sampled memory of its process tree, peaks."""
    marks = work / "marks.jsonl"
    marks.unlink(missing_ok=True)
    ran = run_sampled(python_module("benchmarks.memory", "--child", marks, "--", "train", *argv), interval)
    samples = ran.sampler.rows
    phases = phases_of(marks, ran.t_start, samples)
    main_phases = [p for p in phases if p["phase"] != "(between)"]
    decoded = sum(p["produced_mb"] or 0 for p in main_phases if p["phase"] == "decode")
    stacked = sum(p["produced_mb"] or 0 for p in main_phases if p["phase"] == "stack")
    usage = ran.usage
    return {
        "argv": argv,
        "wall_s": round(ran.wall_s, 1),
        "peak_rss_mb": max(p["peak_mb"] or 0 for p in phases),
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "user_s": round(usage.ru_utime, 1),
        "sys_s": round(usage.ru_stime, 1),
        "peak_tree_pss_mb": max(s[3] for s in samples),
        "peak_tree_rss_mb": max(s[2] for s in samples),
        "decoded_mb": round(decoded, 1),
        "stacked_mb": round(stacked, 1),
        "log_tail": ran.output.splitlines()[-12:],
        "phases": phases,
        "samples": {"columns": TreeSampler.COLUMNS, "rows": samples},
    }


def phases_of(marks: Path, t_start: float, samples: list[tuple]) -> list[dict]:
    """The child's phase records: times relative to its start, and its tree's sampled peak during each phase."""
    phases = [json.loads(line) for line in marks.read_text().splitlines()]
    for p in phases:
        for k in ("t0", "t"):
            if k in p:
                p[k] = round(p[k] - t_start, 2)
    start = 0.0
    for p in phases:
        t0 = p.get("t0", start)
        window = [s for s in samples if t0 <= s[0] <= p["t"]]
        p["tree_pss_peak_mb"] = max((s[3] for s in window), default=None)
        p["processes"] = max((s[4] for s in window), default=None)
        start = p["t"]
    return phases


def phase_peaks(result: dict) -> dict:
    """Largest main-process peak per phase name (evaluations after the start one merged)."""
    out = {}
    for p in result["phases"]:
        name = p["phase"] if p["phase"] != "(between)" else "between"
        out[name] = max(out.get(name, 0), p["peak_mb"] or 0)
    return out


PHASE_ORDER = [
    "decode",
    "stack",
    "model",
    "start evaluation",
    "clustering",
    "training steps",
    "evaluation",
    "pictures",
    "between",
]


def print_row(name: str, r: dict) -> None:
    peaks = phase_peaks(r)
    print(
        f"{name:>10} | peak RSS {r['peak_rss_mb']:7.0f} MB | tree PSS {r['peak_tree_pss_mb']:7.0f} MB | "
        f"decoded {r['decoded_mb']:6.0f} MB | stacked {r['stacked_mb']:6.0f} MB | {r['wall_s']:5.0f} s"
    )
    print("           | " + "  ".join(f"{k} {peaks[k]:.0f}" for k in PHASE_ORDER if k in peaks))


@dataclass
class Job:
    """One run: its name, its training images, and what goes before and after --out (made when it runs)."""

    name: str
    n: int
    options: Callable[[], list[str]]
    overrides: Callable[[], list[str]]


def jobs(args, work: Path) -> list[Job]:
    """The folder preset's runs at each size (no test split, no pictures), then all of CUB when asked."""
    out = [
        Job(
            f"folder N={n}",
            n,
            lambda n=n: ["--data", str(link_folder(args.cub_root, "train", n, work))],
            lambda: ["pictures=false"],
        )
        for n in args.sizes
    ]
    if args.cub:
        out.append(
            Job(
                "CUB 5864+5924",
                5864,
                lambda: ["--data", str(link_folder(args.cub_root, "train", None, work))],
                lambda: [f"test_root={link_folder(args.cub_root, 'test', None, work)}", "pictures=true"],
            )
        )
    return out


def parser():
    ap = base_parser(__doc__, results=True)
    ap.add_argument("--label", required=True, help="results go to results/memory_cpu_<label>.json")
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[500, 1500, 3000, 5864],
        help="numbers of CUB training images for the folder preset runs",
    )
    ap.add_argument("--cub", action="store_true", help="also run on all of CUB, with its test split")
    ap.add_argument("--cub-root", type=Path, default=Path(os.environ.get("UDML_CUB", DEFAULT_CUB)))
    ap.add_argument("--overrides", nargs="*", default=[], help="key=value, after the short schedule")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between two samples of the process tree")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        i = argv.index("--child")
        rest = argv[i + 2 :]
        return child(argv[i + 1], rest[1:] if rest[:1] == ["--"] else rest)
    args = parser().parse_args(argv)
    results_path = Path(args.results or RESULTS / f"memory_cpu_{args.label}.json")
    runs = []
    with tempfile.TemporaryDirectory(prefix="udml-memory-") as tmp:
        work = Path(tmp)
        for job in jobs(args, work):
            name = f"run_name=run{len(runs)}"
            train = job.options() + ["--out", str(work / "runs")] + job.overrides() + [name]
            train += SHORT_SCHEDULE + args.overrides
            print(f"{job.name}: udml train {' '.join(train)}", flush=True)
            r = run(train, args.interval, work)
            r.update(name=job.name, n_train=job.n)
            runs.append(r)
            print_row(job.name, r)
            doc = {
                "label": args.label,
                "command": command_line(__file__, argv),
                "notes": __doc__.split("What is recorded, per run:")[1].strip(),
                "runs": runs,
            }
            write_results(results_path, doc, indent=1)
    print(f"-> {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
