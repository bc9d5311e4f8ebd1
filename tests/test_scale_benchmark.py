"""benchmarks.scale end to end at a tiny size, run as `python -m benchmarks.scale` from the repository root (each size
in a process of its own): the JSON it writes has every step, and the approximate indexes' Recall@1 loss is a finite
number."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("scale") / "scale.json"
    # 1200 <= the query limit: whole evaluate() call; 2000 above it: a query subset, extrapolated.
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--sizes",
        "1200",
        "2000",
        "--exact-query-limit",
        "1500",
        "--kmeans-k",
        "50",
        "--kmeans-iters",
        "2",
        "--device",
        "cpu",
        "--ef-search",
        "64",
        "--results",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| N | step | seconds |" in proc.stdout
    return json.loads(out.read_text())


def rows(doc: dict, n: int) -> dict:
    return {r["step"]: r for r in doc["rows"] if r["n"] == n}


def test_machine_data_and_sizes(results):
    for key in ("date", "commit", "torch", "card", "host_cpus"):
        assert key in results
    assert results["data"]["kind"] == "synthetic"
    sizes = {s["n"]: s for s in results["sizes"]}
    assert set(sizes) == {1200, 2000}
    assert sizes[1200]["kmeans_k"] == 50 and sizes[1200]["classes"] == round(1200 / 5.3)
    assert sizes[1200]["exact_query_subset"] is False and sizes[2000]["exact_query_subset"] is True
    assert sizes[2000]["queries"] == 1500
    for s in sizes.values():
        assert 0.3 < s["metrics"]["recall@1"] <= 1 and 0 < s["metrics"]["nmi"] <= 1
        assert set(s["recall_ks"]) == {1, 10, 100, 1000}


def test_exact_steps_and_extrapolation(results):
    small, big = rows(results, 1200), rows(results, 2000)
    for r in (small, big):
        for step in (
            "synthetic data",
            "k-means torch",
            "exact kNN (evaluation.knn)",
            "Recall@K + MAP@R from the kNN",
            "NMI (k-means K=classes + assignment_nmi)",
        ):
            assert r[step]["seconds"] >= 0 and r[step]["extrapolated"] is False
        assert r["exact kNN (evaluation.knn)"]["peak_rss_mb"] > 0
        # capped at 2 iterations: the default count is extrapolated, and marked so
        assert r["k-means torch, 20 iters"]["extrapolated"] is True
        assert r["NMI, 20 iters"]["extrapolated"] is True
    assert small["evaluate(compute_nmi=False)"]["agrees_with_parts"] is True
    assert "exact kNN, all queries" not in small
    assert big["exact kNN, all queries"]["extrapolated"] is True
    assert big["exact kNN, all queries"]["seconds"] == pytest.approx(
        big["exact kNN (evaluation.knn)"]["seconds"] * 2000 / 1500
    )
    assert "evaluate(compute_nmi=False)" not in big  # all-vs-all is not run above the query limit


def test_approximate_indexes(results):
    pytest.importorskip("faiss")
    for n in (1200, 2000):
        r = rows(results, n)
        assert r["k-means faiss"]["extrapolated"] is False
        assert r["faiss Flat search"]["recall_at_1_loss_points"] == pytest.approx(0, abs=1e-9)
        for step in ("faiss IVF search nprobe=16", "faiss HNSW search efSearch=64"):
            loss = r[step]["recall_at_1_loss_points"]
            assert math.isfinite(loss) and -100 <= loss <= 100
            assert 0 <= r[step]["same_nn_as_exact"] <= 1
        assert r["faiss IVF build"]["seconds"] >= 0 and r["faiss HNSW build"]["seconds"] >= 0
