"""What several benchmarks need, in one place: the machine block every results file carries and the one writer of
results files, the options most scripts share, udml commands run as timed processes with their peak memory,
``udml serve`` started in its own process, the peak-memory readings of /proc, synthetic embeddings and images, and
folders of CUB photos made of file links.

The benchmarks are modules of the package ``benchmarks``, run from the repository root as ``python -m
benchmarks.NAME``; a child process they start finds the package and udml from any folder (``python_env``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# ---------------------------------------------------------------------------------------------------------------
# the record: machine, command, results files


def commit() -> str:
    if os.environ.get("UDML_COMMIT"):
        return os.environ["UDML_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=HERE
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """The machine block of every results file: date, cores, Python, torch, commit and the card (on a CPU: the
    processor and torch's threads)."""
    import torch

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit(),
    }
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
    else:
        info["card"] = "none (CPU)"
        info["cpu"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def sync() -> None:
    """Wait for the GPU, where there is one, so that a timer stops when the work is done."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How the benchmark in file ``script`` was run (``argv``: its arguments, default this process's), typed as
    from the repository root."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", f"benchmarks.{Path(script).stem}", *map(shlex.quote, map(str, args))])


def stamped(record: dict, flat: bool = False) -> dict:
    """``record`` with the machine block: under "machine", or with ``flat`` its keys beside the record's own."""
    return {**record, **machine()} if flat else {**record, "machine": machine()}


def write_results(path: str | Path, doc: dict, *, block: str | None = "nested", indent: int = 2) -> dict:
    """Write a results file (its folder made) with the machine block, and return what was written: ``block``
    "nested" puts the block under "machine", "flat" puts its keys at the top level (the form of the older files,
    which table.py reads), None leaves it to the records inside ``doc``, stamped one by one (files that collect
    the runs of several invocations)."""
    if block is not None:
        doc = stamped(doc, flat=block == "flat")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent) + "\n")
    return doc


def read_results(path: str | Path, empty: dict) -> dict:
    """The records collected so far in a results file, or ``empty`` where there is no file yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else empty


# ---------------------------------------------------------------------------------------------------------------
# the command line


def base_parser(
    doc: str,
    *,
    results: str | Path | bool = False,
    flag: str = "--results",
    results_help: str | None = None,
    out: str | None = None,
    seeds: list[int] | None = None,
    overrides: str | None = None,
) -> argparse.ArgumentParser:
    """A parser whose help is the benchmark's docstring, with the options asked for: ``results``, the results file
    (its default path, or True for none: the script picks it) under the name ``flag``; ``out``, the folder for
    run folders; ``seeds``; ``overrides``, the help of trailing key=value configuration overrides."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if results is not False:
        default = None if results is True else str(results)
        results_help = results_help or f"the results file (default: {default or 'see above'})"
        p.add_argument(flag, default=default, help=results_help)
    if out is not None:
        p.add_argument("--out", default=out, help="folder for the run folders (default: %(default)s)")
    if seeds is not None:
        p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    if overrides is not None:
        p.add_argument("overrides", nargs="*", help=overrides)
    return p


# ---------------------------------------------------------------------------------------------------------------
# processes


def python_env() -> dict[str, str]:
    """This environment with the repository (for ``benchmarks``) and its src/ (for udml) first on PYTHONPATH, so
    that a child process finds both from any working directory."""
    paths = [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def python_module(module: str, *args) -> list[str]:
    """The command line of ``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


# Runs a module, then reports the process's own high-water mark of resident memory on stderr as it exits.
_PEAK_WRAPPER = """\
import runpy, sys
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
try:
    with open("/proc/self/status") as f:
        print("PEAK_RSS_KB", next(line.split()[1] for line in f if line.startswith("VmHWM")), file=sys.stderr)
except (OSError, StopIteration):
    pass
sys.exit(code)
"""


@dataclass
class Timed:
    """A command that ran: wall time, its process's peak resident set (None where /proc is missing), its output."""

    seconds: float
    peak_rss_mb: float | None
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""


def run_timed(*args, module: str = "udml") -> Timed:
    """``python -m MODULE ARGS`` (udml unless told) in its own process, timed, with the peak resident set it reads
    from its own VmHWM as it exits: getrusage's ru_maxrss would not do, as Linux carries it over exec from the
    forked copy of this (torch-importing) process. Exits with the command's error output if it fails."""
    words = [str(a) for a in args]
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, module, *words], capture_output=True, text=True, env=python_env()
    )
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{module} {' '.join(words)} failed:\n{proc.stderr[-3000:]}")
    head, found, tail = proc.stderr.rpartition("PEAK_RSS_KB")
    peak = int(tail.split()[0]) / 1024 if found else None
    result = Timed(seconds, peak, proc.stdout, head if found else proc.stderr)
    memory = f", peak RSS {peak:.0f} MB" if found else ""
    print(f"  {module} {words[0]}: {seconds:.1f} s{memory} | {result.last_line[:140]}", flush=True)
    return result


def read_address(proc: subprocess.Popen) -> str:
    """The address that ``udml serve`` prints once its socket listens."""
    for line in proc.stdout:
        if " at http://" in line:
            return line.split(" at ")[1].split()[0].rstrip("/")
    raise RuntimeError(f"udml serve did not start (exit code {proc.wait()}); its error is printed above")


@contextmanager
def udml_serve(index: str | Path, *options) -> Iterator[tuple[subprocess.Popen, str]]:
    """``udml serve INDEX --port 0`` in its own process for the block: yields the process and the address it
    printed (a free port), and stops it after."""
    cmd = python_module("udml", "serve", index, "--port", "0", *options)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=python_env())
    try:
        yield proc, read_address(proc)
    finally:
        proc.terminate()
        proc.wait(30)


# ---------------------------------------------------------------------------------------------------------------
# peak memory (Linux /proc)


def status_kb(field: str, pid: str | int = "self") -> int | None:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM, ...); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def reset_peak() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float | None:
    kb = status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark since its last reset (VmHWM), else since it started."""
    kb = status_kb("VmHWM")
    return kb / 1024 if kb is not None else maxrss_mb()


# ---------------------------------------------------------------------------------------------------------------
# synthetic data


def synthetic_embeddings(n: int, dim: int, points_per_class: float, noise: float, seed: int):
    """SOP-like embeddings: float32 [n, dim] unit rows around random unit class centres, int64 labels (every class
    at least 2 points, the rest spread uniformly), and the number of classes. A point is
    normalise(centre + noise * g / sqrt(dim)), g standard normal."""
    import torch

    classes = max(2, min(n // 2, round(n / points_per_class)))
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.cat([torch.arange(classes).repeat(2), torch.randint(classes, (n - 2 * classes,), generator=g)])
    labels = labels[torch.randperm(n, generator=g)]
    x = torch.empty(n, dim)
    scale = noise / math.sqrt(dim)
    for s in range(0, n, 65536):  # in blocks: no float64 or N-sized temporaries beyond x itself
        e = min(n, s + 65536)
        x[s:e] = torch.nn.functional.normalize(
            centres[labels[s:e]] + scale * torch.randn(e - s, dim, generator=g), dim=1
        )
    return x, labels, classes


def add_synthetic_options(p: argparse.ArgumentParser, points_per_class: float) -> None:
    """The options of synthetic_embeddings (but N)."""
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--points-per-class",
        type=float,
        default=points_per_class,
        help="N / number of classes (SOP test: 60502 / 11316 = 5.35)",
    )
    p.add_argument("--noise", type=float, default=2.2, help="norm of the noise added to a unit class centre")
    p.add_argument("--seed", type=int, default=0)


def synthetic_image(i: int, classes: int = 500, size: tuple[int, int] | None = None):
    """Image i and its class: the look of the class (background colour, the direction of a gradient, the kind,
    colour and place of a shape), jittered per image, with grain on top. ``size``: (width, height); by default
    about 400 x 300 (width 320-480, height 240-360, one in five portrait)."""
    from PIL import Image

    rng = np.random.default_rng(i)
    c = int(rng.integers(classes))
    look = np.random.default_rng(10_000 + c)
    if size is None:
        w, h = int(rng.integers(320, 481)), int(rng.integers(240, 361))
        if rng.random() < 0.2:
            w, h = h, w
    else:
        w, h = size
    background, ink = look.integers(0, 256, 3), look.integers(0, 256, 3)
    angle = look.uniform(0, 2 * np.pi) + rng.normal(0, 0.2)
    yy, xx = np.ogrid[0:h, 0:w]
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h).astype(np.float32)
    img = background.astype(np.float32) + 70 * ramp[..., None]
    cx, cy = (look.uniform(0.25, 0.75, 2) + rng.normal(0, 0.05, 2)) * (w, h)
    r = min(w, h) * (look.uniform(0.12, 0.3) * rng.uniform(0.8, 1.25))
    if c % 3 == 0:
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    elif c % 3 == 1:
        mask = (abs(xx - cx) < r) & (abs(yy - cy) < 0.6 * r)
    else:
        mask = abs(xx - cx) + abs(yy - cy) < r
    img[mask] = ink
    img += rng.normal(0, 12, (h, w, 1)).astype(np.float32)  # grain, so that the JPEGs are not trivially small
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), c


def write_synthetic_images(
    indices: Iterable[int],
    path_of: Callable[[int, int], Path],
    *,
    classes: int = 500,
    size: tuple[int, int] | None = None,
    threads: int = 8,
) -> None:
    """Save synthetic_image(i) of every i in ``indices`` as a JPEG (quality 85) at ``path_of(i, its class)``, in
    ``threads`` threads. The folders must exist."""

    def save(i: int) -> None:
        img, c = synthetic_image(i, classes, size)
        img.save(path_of(i, c), quality=85)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(save, indices, chunksize=256))


# ---------------------------------------------------------------------------------------------------------------
# CUB photos


def cub_images(cub: str | Path, split: str = "all", *, classes: int | None = None, per_class: int | None = None):
    """CUB-200-2011's photos, class by class in sorted order: ``split`` "train" (classes 1-100), "test" (101-200)
    or "all"; the first ``classes`` classes of the split and the first ``per_class`` photos of each (None: all)."""
    folders = sorted(p for p in (Path(cub) / "images").iterdir() if p.is_dir())
    if split != "all":
        test = split == "test"
        folders = [p for p in folders if (int(p.name.split(".")[0]) >= 101) == test]
    return [f for folder in folders[:classes] for f in sorted(folder.glob("*.jpg"))[:per_class]]


def link_photos(files: Iterable[str | Path], root: Path, *, flat: bool = False) -> Path:
    """Links to ``files`` under ``root``, in one real sub-folder per class (the folder each photo is in), or with
    ``flat`` in ``root`` itself, numbered in order. Real folders, never links to CUB's own: a file written beside
    the photos must not land in the shared data set."""
    root.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(map(Path, files)):
        if flat:
            link = root / f"{k:05d}_{f.name}"
        else:
            (root / f.parent.name).mkdir(exist_ok=True)
            link = root / f.parent.name / f.name
        link.symlink_to(f.resolve())
    return root
