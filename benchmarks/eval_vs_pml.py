"""Exact Recall@1 + MAP@R, udml against pytorch-metric-learning's AccuracyCalculator (faiss), side by side in one
process on the same SOP-sized class-structured embeddings.

    python -m benchmarks.eval_vs_pml                      # 60,502 x 512, 3 alternating rounds, float64 check
    python -m benchmarks.eval_vs_pml --n 6000 --repeats 1 # a quick look

The data are scale.py's synthetic SOP-like embeddings (``harness.synthetic_embeddings``: N L2-normalised float32
vectors of dimension 512 around N / 5.35 random class centres, SOP's test split being 60,502 images of 11,316
classes). Each round times, in alternating order:

- udml: ``evaluate(x, labels, recall_ks=(1,), compute_nmi=False)``: exact Recall@1 and MAP@R, every item a query
  against all the others;
- pml: ``AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")``
  ``.get_accuracy(x, labels)`` (no reference given, so the queries are the reference and each query's own entry
  is dropped: ref_includes_query);
- with ``--knn-loop``, udml's previous path: ``knn`` chunk by chunk of queries + ``recall_at_k`` + ``map_at_r``.

Then (unless ``--no-check``) a float64 brute force over all queries: its Recall@1 and MAP@R must equal udml's.
Writes ``--output`` (default benchmarks/results/eval_vs_pml_cpu.json) with the times, their medians, the ratio, the
metric values, the load average and the machine.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from udml.evaluation import _average_precision_at_r, evaluate, knn, map_at_r, recall_at_k

from .harness import RESULTS, add_synthetic_options, base_parser, sync, synthetic_embeddings, write_results


def udml_metrics(x, labels, chunk_size):
    out = evaluate(x, labels, recall_ks=(1,), compute_nmi=False, chunk_size=chunk_size)
    return {"recall@1": out["recall@1"], "map@r": out["map@r"]}


def pml_metrics(x, labels):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    out = calc.get_accuracy(x, labels)
    return {"precision@1": float(out["precision_at_1"]), "map@r": float(out["mean_average_precision_at_r"])}


def knn_loop_metrics(x, labels, r, k, chunk_size):
    """udml's evaluation before this benchmark: knn chunk by chunk, then the metrics of each chunk."""
    hits, ap_sum = 0.0, 0.0
    for s in range(0, x.shape[0], chunk_size):
        e = min(s + chunk_size, x.shape[0])
        q = torch.arange(s, e)
        _, idx = knn(x[s:e], x, k, exclude=q, chunk_size=chunk_size)
        nl = labels[idx]
        hits += recall_at_k(nl, labels[s:e], [1])[1] * (e - s)
        ap_sum += map_at_r(nl, labels[s:e], r[s:e]) * (e - s)
    return {"recall@1": hits / x.shape[0], "map@r": ap_sum / x.shape[0]}


def brute_force(x, labels, r, k, chunk=512):
    """Recall@1 and MAP@R from float64 similarities, every item a query with itself left out."""
    g = x.double()
    n = x.shape[0]
    hits, ap_sum = 0, 0.0
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        sims = g[s:e] @ g.t()
        sims[torch.arange(e - s), torch.arange(s, e)] = float("-inf")
        idx = sims.topk(k, dim=1).indices
        nl = labels[idx]
        hits += int((nl[:, 0] == labels[s:e]).sum())
        ap_sum += float(_average_precision_at_r(nl, labels[s:e], r[s:e]).sum())
    return {"recall@1": hits / n, "map@r": ap_sum / n}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=RESULTS / "eval_vs_pml_cpu.json", flag="--output")
    p.add_argument("--n", type=int, default=60502)
    add_synthetic_options(p, points_per_class=60502 / 11316)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the medians are reported")
    p.add_argument("--chunk-size", type=int, default=None, help="evaluate's chunk_size (default: its default)")
    p.add_argument("--knn-loop", action="store_true", help="also time udml's previous path (knn chunk by chunk)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 brute-force check")
    args = p.parse_args(argv)

    x, labels, classes = synthetic_embeddings(args.n, args.dim, args.points_per_class, args.noise, args.seed)
    counts = torch.bincount(labels, minlength=classes)
    r = counts[labels] - 1
    k = int(r.max())
    chunk = args.chunk_size or evaluate.__kwdefaults__["chunk_size"]
    info = describe(args, counts, chunk)
    contenders = {"udml": lambda: udml_metrics(x, labels, chunk), "pml": lambda: pml_metrics(x, labels)}
    if args.knn_loop:
        contenders["udml_knn_loop"] = lambda: knn_loop_metrics(x, labels, r, k, chunk)
    record = {"info": info, **alternate(contenders, args.repeats)}
    record["brute_force_check"] = None if args.no_check else check(x, labels, r, k, record["metrics"]["udml"])
    write_results(args.output, record, block="flat")
    print(f"wrote {args.output}")
    return 0


def describe(args, counts: torch.Tensor, chunk: int) -> dict:
    import faiss

    info = {
        "n": args.n,
        "dim": args.dim,
        "classes": len(counts),
        "class_size_min": int(counts.min()),
        "class_size_max": int(counts.max()),
        "max_r": int(counts.max()) - 1,
        "noise": args.noise,
        "seed": args.seed,
        "chunk_size": chunk,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    print(
        f"{args.n} x {args.dim}, {info['classes']} classes of {info['class_size_min']}-{info['class_size_max']}; "
        f"torch threads {info['torch_threads']}, faiss threads {info['faiss_threads']}; load {load()}",
        flush=True,
    )
    return info


def alternate(contenders: dict, repeats: int) -> dict:
    """Time the contenders in rounds, in turn forwards and backwards; their times, medians, last metrics."""
    times = {name: [] for name in contenders}
    metrics, loads = {}, [load()]
    for rep in range(repeats):
        for name in list(contenders) if rep % 2 == 0 else list(contenders)[::-1]:
            sync()
            t = time.perf_counter()
            metrics[name] = contenders[name]()
            sync()
            times[name].append(time.perf_counter() - t)
            print(f"round {rep + 1}: {name} {times[name][-1]:.1f} s {metrics[name]} (load {load()})", flush=True)
        loads.append(load())
    median = {name: statistics.median(v) for name, v in times.items()}
    ratio = median["udml"] / median["pml"]
    print(
        f"medians: {', '.join(f'{n} {v:.1f} s' for n, v in median.items())}; udml / pml = {ratio:.3f} "
        f"({1 / ratio:.2f}x faster)",
        flush=True,
    )
    return {
        "times_s": times,
        "median_s": median,
        "udml_over_pml": ratio,
        "metrics": metrics,
        "load_average_1_5_15": loads,
    }


def check(x, labels, r, k: int, ours: dict) -> dict:
    """udml's Recall@1 and MAP@R against a float64 brute force over all queries."""
    t = time.perf_counter()
    brute = brute_force(x, labels, r, k)
    seconds = time.perf_counter() - t
    equal = all(abs(ours[key] - brute[key]) <= 1e-12 for key in brute)
    print(f"float64 brute force over all queries ({seconds:.0f} s): {brute}; udml {ours}; equal: {equal}", flush=True)
    return {"float64_brute_force": brute, "udml": ours, "equal": equal, "seconds": seconds}


if __name__ == "__main__":
    raise SystemExit(main())
