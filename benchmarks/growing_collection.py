"""A growing collection on real photos: incremental embedding and index, groups and near-duplicates (issue #21).

    python -m benchmarks.growing_collection --cub ../shared/data/CUB_200_2011

Everything runs through the command line, as a user runs it (``udml embed``, ``udml index``, ``udml cluster``,
with ``pretrained:efficientnet_lite0`` on the CPU fast path), timed as whole commands:

1. **Adding to a collection**: ``udml embed`` of the first ``--base`` CUB photos (links, sorted by class), then
   ``--added`` more photos linked in and the same command again (it embeds only those), likewise ``udml index``
   (flat and HNSW) built, then updated.
2. **Groups**: ``udml cluster`` of CUB's 5,924 test images (classes 101-200) at K = 100 (the species count) and at
   the default K; the groups' NMI to the species, beside the NMI of the evaluation (udml.evaluation.evaluate:
   k-means at K = classes, as the field reports it). ``--classes`` and ``--per-class`` take fewer test photos
   (K = the classes taken).
3. **Near-duplicates**: ``--copies`` test photos each copied three ways (exact, resized to 3/4, recompressed as
   JPEG at quality 50) beside the test photos; precision and recall of the duplicate pairs that ``udml cluster``
   finds at thresholds 0.8 to 0.95 (0.9 is the default). Duplicate sets are linked sets, so a low threshold chains
   photos into large sets; pairs of two original CUB photos are counted apart (CUB holds near-identical photos).
   At 0.9 the contact sheets of the largest groups and duplicate sets go to ``cub_test_groups*.png`` beside the
   results file.

Writes ``benchmarks/results/collections_cpu.json`` (``--output``) and prints the numbers.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from udml.embeddings import load_embeddings
from udml.evaluation import evaluate

from .harness import RESULTS, base_parser, cub_images, link_photos, run_timed, write_results

MODEL = "pretrained:efficientnet_lite0"
KINDS = ("exact", "resized", "recompressed")
THRESHOLDS = (0.8, 0.85, 0.9, 0.95)


def udml(*args) -> tuple[float, str]:
    r = run_timed(*args)
    return r.seconds, r.stdout


def adding(cub: Path, base: int, added: int, work: Path) -> dict:
    files = cub_images(cub)[: base + added]
    root, npz = work / "collection", work / "collection.npz"
    link_photos(files[:base], root)
    out = {"base": base, "added": added}
    out["embed_base_s"], _ = udml("embed", MODEL, root, "-o", npz)
    out["index_flat_base_s"], _ = udml("index", npz, "-o", work / "flat.faiss")
    out["index_hnsw_base_s"], _ = udml("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    link_photos(files[base:], root)
    out["embed_update_s"], printed = udml("embed", MODEL, root, "-o", npz)
    assert f"{base} kept, {added} embedded" in printed, printed
    out["index_flat_update_s"], _ = udml("index", npz, "-o", work / "flat.faiss")
    out["index_hnsw_update_s"], _ = udml("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    out["update_over_base"] = out["embed_update_s"] / out["embed_base_s"]
    return out


def grouping(test: list[Path], k: int, work: Path) -> dict:
    from sklearn.metrics import normalized_mutual_info_score

    root, npz = link_photos(test, work / "test"), work / "test.npz"
    out = {}
    out["embed_s"], _ = udml("embed", MODEL, root, "-o", npz)
    emb = load_embeddings(npz)
    species = np.unique([Path(p).parent.name for p in emb.paths], return_inverse=True)[1]
    m = evaluate(torch.from_numpy(emb.embeddings), torch.from_numpy(species))
    out["evaluation"] = {"recall@1": m["recall@1"], "nmi": m["nmi"], "map@r": m["map@r"]}
    for name, extra in ((f"k{k}", ["--k", k]), ("default_k", [])):
        seconds, _ = udml("cluster", npz, "-o", work / f"{name}.json", *extra)
        result = json.loads((work / f"{name}.json").read_text())
        labels = [r["group"] for r in result["images"]]
        out[name] = {
            "seconds": seconds,
            "groups": result["groups"],
            "nmi_to_species": normalized_mutual_info_score(species, labels),
            "duplicate_sets": result["duplicate_sets"],
            "nearest_neighbour_similarity": result["nearest_neighbour_similarity"],
        }
    out["images"] = len(emb.paths)
    return out


def duplicates(test: list[Path], k: int, copies: int, work: Path, sheet: Path) -> dict:
    root = link_photos(test, work / "dups")
    originals = sorted(root.glob("*/*.jpg"))
    truth, kinds = make_copies(originals, copies)
    npz = work / "dups.npz"
    udml("embed", MODEL, root, "-o", npz)
    out = {"photos": len(originals), "copied": copies, "true_pairs": len(truth), "thresholds": {}}
    for threshold in THRESHOLDS:
        csv_path = work / f"dups_{threshold}.csv"
        sheets = ["--sheet", sheet] if threshold == 0.9 else []
        udml("cluster", npz, "-o", csv_path, "--k", k, "--duplicates", threshold, *sheets)
        out["thresholds"][str(threshold)] = score(found_pairs(csv_path), truth, kinds)
        print(f"  threshold {threshold}: {out['thresholds'][str(threshold)]}", flush=True)
    return out


def make_copies(originals: list[Path], copies: int) -> tuple[set[frozenset], dict[str, str]]:
    """Three copies (KINDS) of ``copies`` photos drawn at random, beside them: the true duplicate pairs (each copy
    with its photo and with the other copies of it) and the kind of every copy."""
    rng = np.random.default_rng(0)
    chosen = [originals[i] for i in rng.choice(len(originals), copies, replace=False)]
    truth, kinds = set(), {}
    for f in chosen:
        with Image.open(f) as im:
            im = im.convert("RGB")
            for kind in KINDS:
                copy = f.parent / f"copy_{kind}_{f.stem}.jpg"
                write_copy(f, im, kind, copy)
                truth.add(frozenset((f.name, copy.name)))
                kinds[copy.name] = kind
        names = [f"copy_{k}_{f.stem}.jpg" for k in KINDS]
        truth |= {frozenset(p) for p in itertools.combinations(names, 2)}
    return truth, kinds


def write_copy(original: Path, im: Image.Image, kind: str, copy: Path) -> None:
    if kind == "exact":
        copy.write_bytes(original.read_bytes())
    elif kind == "resized":
        im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.BILINEAR).save(copy, quality=95)
    else:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=50)
        copy.write_bytes(buffer.getvalue())


def found_pairs(csv_path: Path) -> set[frozenset]:
    """The pairs of file names inside each duplicate set of a groups CSV."""
    sets = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if int(r["duplicate_group"]) >= 0:
                sets.setdefault(r["duplicate_group"], []).append(Path(r["path"]).name)
    return {frozenset(p) for names in sets.values() for p in itertools.combinations(names, 2)}


def score(found: set[frozenset], truth: set[frozenset], kinds: dict[str, str]) -> dict:
    hits = found & truth
    missed = truth - found
    originals_only = [sorted(p) for p in found - truth if not any(n.startswith("copy_") for n in p)]
    wrong_copy = len(found - truth) - len(originals_only)
    return {
        "precision": len(hits) / max(1, len(found)),
        "recall": len(hits) / len(truth),
        "found_pairs": len(found),
        # CUB itself holds near-identical photos: pairs of two originals are not counted wrong below
        "pairs_of_two_originals": len(originals_only),
        "pairs_of_a_copy_with_another_photo": wrong_copy,
        "precision_on_copies": len(hits) / max(1, len(hits) + wrong_copy),
        "examples_of_original_pairs": originals_only[:10],
        "missed_by_kind": {k: sum(1 for p in missed if any(kinds.get(n) == k for n in p)) for k in KINDS},
    }


def main(argv: list[str] | None = None) -> int:
    ap = base_parser(__doc__, results=RESULTS / "collections_cpu.json", flag="--output")
    ap.add_argument("--cub", required=True, help="CUB_200_2011 root")
    ap.add_argument("--base", type=int, default=10_000)
    ap.add_argument("--added", type=int, default=100)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--classes", type=int, default=100, help="groups and duplicates: the first N test classes")
    ap.add_argument("--per-class", type=int, default=None, help="groups and duplicates: photos per class (all)")
    ap.add_argument("--parts", nargs="+", default=["adding", "grouping", "duplicates"])
    args = ap.parse_args(argv)
    cub = Path(args.cub).resolve()
    test = cub_images(cub, "test", classes=args.classes, per_class=args.per_class)
    results = {}
    with tempfile.TemporaryDirectory(prefix="udml-collections-") as tmp:
        work = Path(tmp)
        if "adding" in args.parts:
            print("adding to a collection", flush=True)
            results["adding"] = adding(cub, args.base, args.added, work)
        if "grouping" in args.parts:
            print("groups of CUB's test classes", flush=True)
            results["grouping"] = grouping(test, args.classes, work)
        if "duplicates" in args.parts:
            print("near-duplicates", flush=True)
            sheet = Path(args.output).parent / "cub_test_groups.png"
            results["duplicates"] = duplicates(test, args.classes, args.copies, work, sheet)
    write_results(args.output, results)
    print(json.dumps(results, indent=1))
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
