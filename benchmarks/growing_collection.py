"""A growing collection on real photos: incremental embedding and index, groups and near-duplicates (issue #21).

    python benchmarks/growing_collection.py --cub ../shared/data/CUB_200_2011

Everything runs through the command line, as a user runs it (``udml embed``, ``udml index``, ``udml cluster``,
with ``pretrained:efficientnet_lite0`` on the CPU fast path), timed as whole commands:

1. **Adding to a collection**: ``udml embed`` of the first ``--base`` CUB photos (links, sorted by class), then
   ``--added`` more photos linked in and the same command again (it embeds only those), likewise ``udml index``
   (flat and HNSW) built, then updated.
2. **Groups**: ``udml cluster`` of CUB's 5,924 test images (classes 101-200) at K = 100 (the species count) and at
   the default K; the groups' NMI to the species, beside the NMI of the evaluation (udml.evaluation.evaluate:
   k-means at K = classes, as the field reports it).
3. **Near-duplicates**: ``--copies`` test photos each copied three ways (exact, resized to 3/4, recompressed as
   JPEG at quality 50) beside the test photos; precision and recall of the duplicate pairs that ``udml cluster``
   finds at thresholds 0.8 to 0.95 (0.9 is the default). Duplicate sets are linked sets, so a low threshold chains
   photos into large sets; pairs of two original CUB photos are counted apart (CUB holds near-identical photos).
   At 0.9 the contact sheets of the largest groups and duplicate sets go to ``results/cub_test_groups*.png``.

Writes ``benchmarks/results/collections_cpu.json`` and prints the numbers.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from udml.embeddings import load_embeddings  # noqa: E402
from udml.evaluation import evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "pretrained:efficientnet_lite0"
KINDS = ("exact", "resized", "recompressed")


def udml(*args) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "udml", *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"udml {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    print(f"  udml {args[0]} ... {seconds:.1f} s: {proc.stdout.strip().splitlines()[-1]}", flush=True)
    return seconds, proc.stdout


def link(files, root: Path) -> None:
    for f in files:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        (root / f.parent.name / f.name).symlink_to(f)


def adding(cub: Path, base: int, added: int, work: Path) -> dict:
    files = sorted((cub / "images").glob("*/*.jpg"))[: base + added]
    root, npz = work / "collection", work / "collection.npz"
    link(files[:base], root)
    out = {"base": base, "added": added}
    out["embed_base_s"], _ = udml("embed", MODEL, root, "-o", npz)
    out["index_flat_base_s"], _ = udml("index", npz, "-o", work / "flat.faiss")
    out["index_hnsw_base_s"], _ = udml("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    link(files[base:], root)
    out["embed_update_s"], printed = udml("embed", MODEL, root, "-o", npz)
    assert f"{base} kept, {added} embedded" in printed, printed
    out["index_flat_update_s"], _ = udml("index", npz, "-o", work / "flat.faiss")
    out["index_hnsw_update_s"], _ = udml("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    out["update_over_base"] = out["embed_update_s"] / out["embed_base_s"]
    return out


def test_classes(cub: Path, root: Path) -> None:
    """Links to every photo of CUB's classes 101-200 in real folders under ``root`` (never links to CUB's own
    folders: files written under ``root`` must not land in the data set)."""
    link(sorted(p for p in (cub / "images").glob("*/*.jpg") if int(p.parent.name.split(".")[0]) >= 101), root)


def grouping(cub: Path, work: Path) -> dict:
    root, npz = work / "test", work / "test.npz"
    root.mkdir()
    test_classes(cub, root)
    out = {}
    out["embed_s"], _ = udml("embed", MODEL, root, "-o", npz)
    emb = load_embeddings(npz)
    species = np.unique([Path(p).parent.name for p in emb.paths], return_inverse=True)[1]
    m = evaluate(torch.from_numpy(emb.embeddings), torch.from_numpy(species))
    out["evaluation"] = {"recall@1": m["recall@1"], "nmi": m["nmi"], "map@r": m["map@r"]}
    from sklearn.metrics import normalized_mutual_info_score

    for name, extra in (("k100", ["--k", "100"]), ("default_k", [])):
        seconds, printed = udml("cluster", npz, "-o", work / f"{name}.json", *extra)
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


def duplicates(cub: Path, copies: int, work: Path) -> dict:
    root = work / "dups"
    root.mkdir()
    test_classes(cub, root)
    originals = sorted(root.glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    chosen = [originals[i] for i in rng.choice(len(originals), copies, replace=False)]
    truth, kinds = set(), {}
    for n, f in enumerate(chosen):
        with Image.open(f) as im:
            im = im.convert("RGB")
            for kind in KINDS:
                copy = root / f.parent.name / f"copy_{kind}_{f.stem}.jpg"
                if kind == "exact":
                    copy.write_bytes(f.read_bytes())
                elif kind == "resized":
                    im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.BILINEAR).save(copy, quality=95)
                else:
                    buffer = io.BytesIO()
                    im.save(buffer, "JPEG", quality=50)
                    copy.write_bytes(buffer.getvalue())
                truth.add(frozenset((f.name, copy.name)))
                kinds[copy.name] = kind
    # exact, resized and recompressed copies of one photo are duplicates of each other too
    for f in chosen:
        names = [f"copy_{k}_{f.stem}.jpg" for k in KINDS]
        truth |= {frozenset(p) for p in itertools.combinations(names, 2)}
    npz = work / "dups.npz"
    udml("embed", MODEL, root, "-o", npz)
    out = {"photos": len(originals), "copied": copies, "true_pairs": len(truth), "thresholds": {}}
    for threshold in (0.8, 0.85, 0.9, 0.95):
        csv_path = work / f"dups_{threshold}.csv"
        sheet = ["--sheet", HERE / "results" / "cub_test_groups.png"] if threshold == 0.9 else []
        udml("cluster", npz, "-o", csv_path, "--k", "100", "--duplicates", threshold, *sheet)
        sets = {}
        with open(csv_path, newline="") as f:
            for r in csv.DictReader(f):
                if int(r["duplicate_group"]) >= 0:
                    sets.setdefault(r["duplicate_group"], []).append(Path(r["path"]).name)
        found = {frozenset(p) for names in sets.values() for p in itertools.combinations(names, 2)}
        hits = found & truth
        missed = truth - found
        originals_only = [sorted(p) for p in found - truth if not any(n.startswith("copy_") for n in p)]
        wrong_copy = len(found - truth) - len(originals_only)
        out["thresholds"][str(threshold)] = {
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
        print(f"  threshold {threshold}: {out['thresholds'][str(threshold)]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cub", required=True, help="CUB_200_2011 root")
    ap.add_argument("--base", type=int, default=10_000)
    ap.add_argument("--added", type=int, default=100)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--parts", nargs="+", default=["adding", "grouping", "duplicates"])
    ap.add_argument("--output", type=Path, default=HERE / "results" / "collections_cpu.json")
    args = ap.parse_args()
    cub = Path(args.cub).resolve()
    results = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="udml-collections-") as tmp:
        work = Path(tmp)
        if "adding" in args.parts:
            print("adding to a collection", flush=True)
            results["adding"] = adding(cub, args.base, args.added, work)
        if "grouping" in args.parts:
            print("groups of CUB's test classes", flush=True)
            results["grouping"] = grouping(cub, work)
        if "duplicates" in args.parts:
            print("near-duplicates", flush=True)
            results["duplicates"] = duplicates(cub, args.copies, work)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
