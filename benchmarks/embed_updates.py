"""What `udml embed` costs when a collection barely changes (issue #30, item 3): nothing new, and a few new photos.

    python -m benchmarks.embed_updates --cub ../shared/data/CUB_200_2011 --n 10000 --added 10

The first ``--n`` CUB photos, linked into real folders, are embedded once with ``pretrained:efficientnet_lite0``
(the whole command timed); then the same command with nothing new, changed or removed (``--repeats`` times: it
lists and stats the folder and stops without loading the model); then ``--added`` more photos linked in and the
command again (it loads the model and embeds only those); and, for comparison, ``udml embed`` of a folder holding
just those ``--added`` photos (the model's load and that many images, with nothing to read or write besides).
Each is a whole command in its own process, as a user runs it.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from .harness import RESULTS, base_parser, cub_images, link_photos, run_timed, write_results


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=RESULTS / "embed_updates_cpu.json")
    p.add_argument("--cub", required=True)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--added", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="pretrained:efficientnet_lite0")
    args = p.parse_args(argv)
    photos = cub_images(args.cub)
    if len(photos) < args.n + args.added:
        raise SystemExit(f"--n {args.n} + --added {args.added} is more than CUB's {len(photos)} photos")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = measure(args, photos, tmp)
    write_results(args.results, result)
    return 0


def measure(args, photos: list[Path], tmp: Path) -> dict:
    folder, out = link_photos(photos[: args.n], tmp / "photos"), tmp / "photos.npz"
    embed = ["embed", args.model, folder, "-o", out]
    first = run_timed(*embed)
    noop = [run_timed(*embed) for _ in range(args.repeats)]
    assert all("up to date" in t.last_line for t in noop), noop[-1].last_line
    added = photos[args.n : args.n + args.added]
    link_photos(added, tmp / "added_root" / "new")
    for f in added:  # into the collection, in a folder of their own
        (folder / "new").mkdir(exist_ok=True)
        (folder / "new" / f.name).symlink_to(f.resolve())
    update = run_timed(*embed)
    alone = run_timed("embed", args.model, tmp / "added_root", "-o", tmp / "added.npz")
    seconds = [t.seconds for t in noop]
    return {
        "command": f"udml embed {args.model} FOLDER -o FILE.npz",
        "n": args.n,
        "added": args.added,
        "first_embed": timed(first),
        "no_op": {"seconds": seconds, "median_s": statistics.median(seconds), "said": noop[-1].last_line},
        "update": timed(update),
        "added_alone": timed(alone),
    }


def timed(t) -> dict:
    return {"seconds": round(t.seconds, 2), "peak_rss_mb": t.peak_rss_mb, "said": t.last_line}


if __name__ == "__main__":
    raise SystemExit(main())
