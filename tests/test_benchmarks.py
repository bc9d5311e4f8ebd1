"""One smoke test per benchmark (benchmarks/NAME.py, run as ``python -m benchmarks.NAME``), each at a tiny size on real
small data: the Omniglot subset shipped in udml, a few CUB photos read in place, synthetic images or embeddings. Each
runs the benchmark's main() as its command line would (the benchmarks that measure processes start their own) and
checks what it wrote. benchmarks.scale has its own, tests/test_scale_benchmark.py."""

import json
import pkgutil
from importlib import resources
from pathlib import Path

import pytest
from conftest import shared_data

import benchmarks
from benchmarks import harness

MACHINE = ("date", "host_cpus", "python", "torch", "commit", "card")
# a tiny udml train run: three clusters of two images a batch, two rotated images, 64 px, one round, no loader
# processes (starting them takes longer than such a run)
TINY_TRAINING = [
    "num_workers=0",
    "image_size=64",
    "resize_size=72",
    "num_clusters=3",
    "clusters_per_batch=3",
    "images_per_cluster=2",
    "rotation_images=2",
    "pseudo_epochs=1",
    "recluster_every=1",
    "eval_batch_size=16",
    "pictures=false",
    "cache_images=true",
]
OMNIGLOT_MINI = Path(str(resources.files("udml") / "packs" / "omniglot_mini.npz"))


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def has_machine_block(doc: dict) -> bool:
    return all(key in doc for key in MACHINE)


def tiny_run(folder: Path, config: str = "omniglot_mini", overrides: tuple[str, ...] = ()) -> Path:
    """A run folder as udml train leaves it (config.yaml, model.pt), its network untrained."""
    import torch

    from udml.checkpoint import save_model
    from udml.config import make_config, save_config
    from udml.models import model_from_config

    cfg = make_config(config, list(overrides))
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    save_model(model_from_config(cfg), cfg, folder / "model.pt")
    return folder


@pytest.fixture
def cub() -> Path:
    return shared_data("CUB_200_2011")


@pytest.fixture
def cub_folders(cub, tmp_path) -> tuple[Path, Path]:
    """(4 photos of each of CUB's first 3 training classes, the same of its first 3 test classes), linked."""
    train = harness.link_photos(harness.cub_images(cub, "train", classes=3, per_class=4), tmp_path / "train")
    test = harness.link_photos(harness.cub_images(cub, "test", classes=3, per_class=4), tmp_path / "test")
    return train, test


def test_every_benchmark_has_a_smoke_test():
    modules = {m.name for m in pkgutil.iter_modules(benchmarks.__path__)} - {"harness", "suite", "scale"}
    assert modules and {f"test_{m}" for m in modules} <= set(globals())


# ---------------------------------------------------------------------------------------------------------------
# the harness


def test_results_files_carry_the_machine_block(tmp_path):
    nested = harness.write_results(tmp_path / "a" / "nested.json", {"rows": [1]})
    flat = harness.write_results(tmp_path / "flat.json", {"rows": [1]}, block="flat")
    none = harness.write_results(tmp_path / "none.json", {"rows": [harness.stamped({"row": 1})]}, block=None)
    assert read(tmp_path / "a" / "nested.json") == nested and has_machine_block(nested["machine"])
    assert has_machine_block(read(tmp_path / "flat.json")) and flat["rows"] == [1]
    assert "machine" not in none and has_machine_block(read(tmp_path / "none.json")["rows"][0]["machine"])
    assert harness.command_line("benchmarks/scale.py", ["--sizes", "6000", "a b"]) == (
        "python -m benchmarks.scale --sizes 6000 'a b'"
    )


def test_cub_photos_are_file_links_in_real_folders(cub, tmp_path):
    files = harness.cub_images(cub, "test", classes=2, per_class=3)
    assert len(files) == 6 and {f.parent.name[:4] for f in files} == {"101.", "102."}
    root = harness.link_photos(files, tmp_path / "photos")
    folders = sorted(root.iterdir())
    assert [f.name for f in folders] == [f.parent.name for f in files[::3]]
    assert all(not f.is_symlink() and f.is_dir() for f in folders)
    assert all(p.is_symlink() and p.resolve() == f.resolve() for p, f in zip(sorted(root.glob("*/*")), files))
    flat = harness.link_photos(files[:2], tmp_path / "flat", flat=True)
    assert [p.name for p in sorted(flat.iterdir())] == [f"{k:05d}_{f.name}" for k, f in enumerate(files[:2])]


def test_a_timed_udml_command_reports_its_peak_memory():
    ran = harness.run_timed("train", "--help")
    assert ran.seconds > 0 and 10 < ran.peak_rss_mb < 4000 and "usage" in ran.stdout


# ---------------------------------------------------------------------------------------------------------------
# the benchmarks, in the order of their names


def test_backbones(cub, tmp_path):
    from benchmarks import backbones

    out = tmp_path / "backbones.json"
    args = ["--cub", str(cub), "--backbones", "efficientnet_lite0", "--classes", "3", "--per-class", "3"]
    assert backbones.main([*args, "--output", str(out)]) == 0  # 9 photos: Recall@8 has 8 others to look at
    doc = read(out)
    row = doc["backbones"]["efficientnet_lite0"]
    assert doc["images"] == 9 and has_machine_block(doc["machine"])
    assert row["crop_size"] == 224 and row["images_per_s"] > 0 and 0 <= row["recall@1"] <= 100
    speed = tmp_path / "speed.json"  # a downloadable backbone, offline: random weights, its speed alone
    args = ["--cub", str(cub), "--backbones", "dino_vits16", "--classes", "2", "--per-class", "2", "--speed-only"]
    assert backbones.main([*args, "--output", str(speed)]) == 0
    row = read(speed)["backbones"]["dino_vits16"]
    assert row["weights"] == "random (speed only)" and row["dim"] == 384 and "recall@1" not in row


@pytest.mark.slow
def test_collection_scale(tmp_path):
    from benchmarks import collection_scale

    out = tmp_path / "collection_scale.json"
    assert collection_scale.main(["--n", "200", "--folder", str(tmp_path), "--results", str(out)]) == 0
    doc = read(out)
    steps = doc["steps"]
    assert doc["n"] == 200 and doc["added"] == 2 and has_machine_block(doc["machine"])
    assert len(list((tmp_path / "n200").glob("*/*.jpg"))) == 202
    for name in ("embed", "index_flat", "index_hnsw", "search_flat_10", "embed_update", "cluster"):
        assert steps[name]["seconds"] > 0 and steps[name]["peak_rss_mb"] > 20, name
    assert steps["serve"]["count"] == 200 and steps["serve"]["neighbours_ms_median"] > 0
    assert "2 embedded" in steps["embed_update"]["output"]
    assert steps["serve"]["load"]["wrong_status"] == 0 and steps["serve"]["still_answering"]


def test_cluster_scale(tmp_path):
    from benchmarks import cluster_scale

    out = tmp_path / "cluster.json"
    assert cluster_scale.main(["--sizes", "3000", "--exact-up-to", "3000", "--dim", "32", "--results", str(out)]) == 0
    row = read(out)["rows"][0]
    assert row["n"] == 3000 and row["approximate"]["seconds"] > 0 and row["exact"]["peak_rss_mb"] > 0
    assert "as asked (--approximate)" in row["approximate"]["said"]
    dup = row["duplicates_vs_exact"]  # the HNSW graph finds every near-copy pair of so small a set, and invents none
    assert dup["exact_pairs"] >= 60 and dup["recall"] == dup["precision"] == 1.0
    assert "kmeans two-level" in row["approximate"]["said"] and 0 < row["groups_nmi_two_level_vs_one"] <= 1
    assert all(0 < row[m]["groups"]["nmi_to_classes"] <= 1 for m in ("approximate", "exact"))
    out = tmp_path / "kmeans.json"
    args = ["--kmeans-only", "--sizes", "3000", "--exact-up-to", "3000", "--dim", "32", "--results", str(out)]
    assert cluster_scale.main(args) == 0
    row = read(out)["rows"][0]
    assert row["k"] == 60 and row["two_level"]["seconds"] >= 0 and row["one_level"]["nmi_to_classes"] > 0


@pytest.mark.slow
def test_cpu_ceiling(tmp_path):
    from benchmarks import cpu_ceiling

    out = tmp_path / "cpu_ceiling.json"
    assert cpu_ceiling.main(["--small-rounds", "1", "--steps", "1", "--output", str(out)]) == 0
    doc = read(out)
    model = doc["models"]["smallconv_28"]
    assert list(doc["models"]) == ["smallconv_28"] and has_machine_block(doc["machine"])
    for what, unit in cpu_ceiling.UNITS:
        assert all(v > 0 for v in model[what][unit].values()) and model[what]["udml_over_ceiling"] > 0


@pytest.mark.slow
def test_cpu_methods(cub_folders, tmp_path):
    from benchmarks import cpu_methods

    train, test = cub_folders
    out = tmp_path / "cpu_methods.json"
    args = ["--data", str(train), "--rows", "udml_ss", "--split", "test", "--minutes", "2", "--out", str(tmp_path)]
    overrides = ["dataset=folder", f"test_root={test}", *TINY_TRAINING]
    assert cpu_methods.main([*args, "--results", str(out), *overrides]) == 0
    (row,) = read(out)["rows"]
    assert row["row"] == "udml_ss" and row["returncode"] == 0 and row["finished"]
    assert 0 < row["start"]["recall@1"] <= 1 and 0 < row["final"]["recall@1"] <= 1 and row["curve"]
    assert row["seconds_per_step"] > 0 and has_machine_block(row["machine"])


@pytest.mark.slow
def test_cub(cub_folders, tmp_path):
    from benchmarks import cub

    train, test = cub_folders
    out = tmp_path / "cub.json"
    args = ["--data", str(train), "--rows", "udml_ss", "--out", str(tmp_path / "runs"), "--results", str(out)]
    assert cub.main([*args, "dataset=folder", f"test_root={test}", "eval_every=0", *TINY_TRAINING]) == 0
    doc = read(out)
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == {"pretrained start (embedding)", "pretrained start (pooled)", "udml_ss"}
    assert rows["udml_ss"]["finished"] and rows["udml_ss"]["step"] > 0
    assert all(0 < r["recall@1"] <= 1 and 0 <= r["nmi"] <= 1 for r in rows.values())
    assert has_machine_block(doc) and doc["config"] == "cub_lite0"


def test_eval_vs_pml(tmp_path):
    from benchmarks import eval_vs_pml

    out = tmp_path / "eval_vs_pml.json"
    assert eval_vs_pml.main(["--n", "600", "--dim", "32", "--repeats", "1", "--knn-loop", "--output", str(out)]) == 0
    doc = read(out)
    m = doc["metrics"]
    assert doc["brute_force_check"]["equal"] and doc["udml_over_pml"] > 0 and has_machine_block(doc)
    assert m["udml"]["recall@1"] == pytest.approx(m["pml"]["precision@1"])
    assert m["udml"]["map@r"] == pytest.approx(m["pml"]["map@r"], abs=1e-6)
    assert m["udml_knn_loop"] == pytest.approx(m["udml"])


def test_first_clustering(cub_folders, tmp_path):
    from benchmarks import first_clustering

    train, _ = cub_folders
    out = tmp_path / "first.json"
    args = ["--data", str(train), "--seeds", "0", "--cache", str(tmp_path / "pooled.npz"), "--results", str(out)]
    overrides = ["dataset=folder", "train_split=all", "image_size=64", "num_clusters=3", "clusters_per_batch=3"]
    assert first_clustering.main([*args, *overrides]) == 0
    doc = read(out)
    assert [r["geometry"] for r in doc["rows"]] == [g for g, _ in first_clustering.GEOMETRIES]
    assert all(0 <= r["diagnostic_nmi_true_classes"] <= 1 and r["min_size"] >= 1 for r in doc["rows"])
    assert doc["k"] == 3 and has_machine_block(doc["machine"]) and (tmp_path / "pooled.npz").is_file()


def test_embeddings_shards(tmp_path):
    from benchmarks import embeddings_shards

    out = tmp_path / "shards.json"
    assert embeddings_shards.main(["--sizes", "4000", "--dim", "16", "--results", str(out)]) == 0
    row = read(out)["rows"][0]
    assert row["n"] == 4000 and row["changed_rows"] == 40
    assert row["shards"]["update_write"]["bytes"] < 0.1 * row["npz"]["update_write"]["bytes"]


def test_embed_updates(cub, tmp_path):
    from benchmarks import embed_updates

    out = tmp_path / "updates.json"
    assert (
        embed_updates.main(["--cub", str(cub), "--n", "6", "--added", "2", "--repeats", "2", "--results", str(out)])
        == 0
    )
    doc = read(out)
    assert doc["n"] == 6 and len(doc["no_op"]["seconds"]) == 2 and "up to date" in doc["no_op"]["said"]
    assert (
        "6 kept, 2 embedded, 0 removed" in doc["update"]["said"] and "2 images embedded" in doc["added_alone"]["said"]
    )
    assert doc["no_op"]["median_s"] < doc["update"]["seconds"] and has_machine_block(doc["machine"])


@pytest.mark.slow
def test_growing_collection(cub, tmp_path):
    from benchmarks import growing_collection

    out = tmp_path / "collections.json"
    args = ["--cub", str(cub), "--base", "4", "--added", "2", "--copies", "2", "--classes", "3", "--per-class", "6"]
    assert growing_collection.main([*args, "--output", str(out)]) == 0
    doc = read(out)
    assert doc["adding"]["embed_update_s"] > 0 and doc["adding"]["update_over_base"] > 0
    assert doc["grouping"]["images"] == 18 and doc["grouping"]["k3"]["groups"] == 3
    exact = doc["duplicates"]["thresholds"]["0.9"]
    assert doc["duplicates"]["true_pairs"] == 12 and exact["missed_by_kind"]["exact"] == 0
    assert has_machine_block(doc["machine"]) and (tmp_path / "cub_test_groups.png").is_file()


def test_interpolate_start(tmp_path):
    from benchmarks import interpolate_start

    photos = tmp_path / "photos"  # 24 synthetic images of 4 classes, a folder per class: the run's test split
    for c in range(4):
        (photos / f"c{c}").mkdir(parents=True)
    harness.write_synthetic_images(range(24), lambda i, c: photos / f"c{c}" / f"{i}.jpg", classes=4, size=(40, 30))
    run = tiny_run(tmp_path / "run", "digits", ("dataset=folder", f"data_root={photos}", f"test_root={photos}"))
    assert interpolate_start.main([str(run), "--alphas", "0", "1"]) == 0
    doc = read(run / "interpolate_start.json")
    assert has_machine_block(doc["machine"])
    assert all(0 < doc[a]["recall@1"] <= 1 and 0 <= doc[a]["nmi"] <= 1 for a in ("0.0", "1.0"))


def test_make_omniglot_mini(tmp_path):
    from benchmarks import make_omniglot_mini
    from udml.datasets import load_omniglot_mini

    omniglot = shared_data("omniglot")
    tiny = tmp_path / "omniglot"  # one character of each of the first 4 background and 2 evaluation alphabets
    for folder, alphabets in (("images_background", 4), ("images_evaluation", 2)):
        for alphabet in make_omniglot_mini.sorted_dirs(omniglot / folder)[:alphabets]:
            char = make_omniglot_mini.sorted_dirs(omniglot / folder / alphabet)[0]
            files = sorted((omniglot / folder / alphabet / char).glob("*.png"))
            harness.link_photos(files, tiny / folder / alphabet / char, flat=True)
    packs = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for pack in packs:
        assert make_omniglot_mini.main(["--data", str(tiny), "--out", str(pack)]) == 0
    assert packs[0].read_bytes() == packs[1].read_bytes()  # byte for byte the same
    for split in ("train", "val", "test"):
        images = load_omniglot_mini(packs[0], split, strict=False)
        assert len(images.images) == 20 and images.images[0].size == (28, 28) and set(images.labels) == {0}


@pytest.mark.slow
def test_memory(cub, tmp_path):
    from benchmarks import memory

    out = tmp_path / "memory.json"
    args = ["--label", "smoke", "--sizes", "12", "--cub-root", str(cub), "--results", str(out), "--interval", "0.1"]
    assert memory.main([*args, "--overrides", *TINY_TRAINING]) == 0
    doc = read(out)
    (run,) = doc["runs"]
    phases = {p["phase"] for p in run["phases"]}
    assert {"decode", "model", "clustering", "training steps"} <= phases, phases
    assert run["n_train"] == 12 and run["peak_rss_mb"] > 100 and run["peak_tree_pss_mb"] > 100 and run["decoded_mb"] > 0
    assert doc["command"].startswith("python -m benchmarks.memory --label smoke") and has_machine_block(doc["machine"])


@pytest.mark.slow
def test_omniglot(tmp_path):
    from benchmarks import omniglot

    out = tmp_path / "omniglot.json"
    args = ["--config", "omniglot_mini", "--data", str(OMNIGLOT_MINI), "--rows", "udml_ss", "--seeds", "0"]
    overrides = ["pseudo_epochs=1", "recluster_every=1", "num_clusters=16", "pictures=false", "num_workers=0"]
    assert omniglot.main([*args, "--out", str(tmp_path / "runs"), "--results", str(out), *overrides]) == 0
    doc = read(out)
    start, trained = doc["rows"]
    assert start["row"] == "random start" and trained["row"] == "udml_ss" and trained["finished"]
    assert 0 < start["recall@1"] < trained["recall@1"] <= 1 and has_machine_block(doc)


def results_file(path: Path, rows: dict[str, list[float]], commit: str = "abc1234") -> Path:
    """A results file of benchmarks.cub or .omniglot: rows of seeds 0, 1, ... with these Recall@1, and curves."""
    records = [
        {
            "row": row,
            "seed": seed,
            "finished": True,
            **{"recall@1": r1, "nmi": r1 / 2, "map@r": r1 / 4, "step": 10},
            "curve": [
                {"step": s, "elapsed_s": 30.0 * s + seed, "recall@1": r1 * s / 10, "nmi": r1 * s / 20}
                for s in (0, 5, 10)
            ],
        }
        for row, values in rows.items()
        for seed, r1 in enumerate(values)
    ]
    path.write_text(json.dumps({"commit": commit, "rows": records}))
    return path


def test_plot_curves(tmp_path):
    from benchmarks import plot_curves

    results = results_file(tmp_path / "r.json", {"udml_ss": [0.5, 0.6], "udml": [0.4, 0.45]})
    assert plot_curves.main([str(results), "--title", "smoke", "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gain = ["--x", "minutes", "--gain", "--out", str(tmp_path / "gain.png")]
    assert plot_curves.main([str(results), *gain]) == 0
    xs, values = plot_curves.aligned(
        [(r["curve"], True) for r in read(results)["rows"][:2]], "recall@1", "minutes", True
    )
    assert xs[0] == pytest.approx(1 / 60) and xs[-1] == pytest.approx(5) and values[1, 0] == pytest.approx(0)
    assert values[0, -1] == pytest.approx(50)  # the first seed of udml_ss: 0.5 at 5 minutes, from 0
    with pytest.raises(SystemExit, match="no curves"):
        plot_curves.main([str(results), "--rows", "supervised", "--out", str(tmp_path / "none.png")])


def test_refine_sweep(tmp_path):
    from benchmarks import refine_sweep

    model = tiny_run(tmp_path / "run") / "model.pt"
    out = tmp_path / "refine.json"
    args = ["--model", str(model), "--dataset", "omniglot_mini", "--split", "test", "--ks", "2", "--alphas", "1"]
    for label in ("one", "two"):
        assert refine_sweep.main([*args, "--nmi-seeds", "0", "--label", label, "--results", str(out)]) == 0
    doc = read(out)
    assert set(doc) == {"one", "two"}  # merged by label
    entry = doc["one"]
    assert entry["images"] == 2960 and has_machine_block(entry)
    assert [(r["k"], r["alpha"]) for r in entry["rows"]] == [(0, None), (2, 1.0)]
    assert all(0 < r["recall@1"] <= 1 and 0 <= r["nmi"] <= 1 for r in entry["rows"])


def test_serve_load(tmp_path):
    from benchmarks import serve_load

    out = tmp_path / "serve_load.json"
    args = ["--n", "300", "--files", "40", "--requests", "80", "--clients", "4", "--results", str(out)]
    assert serve_load.main(args) == 0
    doc = read(out)
    assert doc["n"] == 300 and has_machine_block(doc["machine"]) and doc["still_answering"]
    load = doc["load"]
    assert load["requests"] == 80 and load["wrong_status"] == 0 and doc["server_peak_rss_mb"] > 20
    assert sum(load[k]["count"] for k in serve_load.WEIGHTS) == 80
    assert load["page"]["status"] == [200] and 0 < load["page"]["p50_ms"] <= load["page"]["p95_ms"]


def test_serve_latency(tmp_path):
    from benchmarks import serve_latency

    out = tmp_path / "serve_latency.json"
    args = ["--n", "2000", "--dim", "32", "--queries", "5", "--warmup", "1", "-k", "3", "--results", str(out)]
    assert serve_latency.main(args) == 0
    doc = read(out)
    assert set(doc["latency"]) == {"library", "test_client", "http"} and has_machine_block(doc)
    assert all(r["queries"] == 5 and 0 < r["median_ms"] <= r["max_ms"] for r in doc["latency"].values())
    assert doc["command"].startswith("python -m benchmarks.serve_latency --n 2000")


def test_store(tmp_path, monkeypatch):
    from benchmarks import store

    monkeypatch.setattr(store, "PER_FOLDER", 50)  # sub-folders of 50 generated images, not 1,000
    out = tmp_path / "store.json"
    args = ["--folder", str(tmp_path), "--sizes", "100", "--memory-max", "100", "--batches", "1", "--threads", "2"]
    assert store.main([*args, "--interval", "0.1", "--results", str(out)]) == 0
    doc = read(out)
    runs = {r["mode"]: r for r in doc["runs"]}
    assert set(runs) == {"memory", "disk"} and has_machine_block(doc["machine"])
    assert len(list((tmp_path / "n100").glob("*/*.jpg"))) == 100
    for r in runs.values():
        assert r["n"] == 100 and r["train_img_s"] > 0 and r["embed_img_s"] > 0 and r["peak_tree_pss_mb"] > 0
    assert runs["disk"]["store_mb"] > 0 and runs["memory"]["decoded_mb"] > 0


def test_table(tmp_path, capsys):
    from benchmarks import table

    first = results_file(tmp_path / "a.json", {"udml": [0.5, 0.7], "udml_ss": [0.6]}, commit="aaa")
    second = results_file(tmp_path / "b.json", {"udml_ss": [0.6, 0.8]}, commit="bbb")
    assert table.main([str(first), str(second), "--rows", "udml_ss", "udml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "commits: aaa, bbb"
    assert lines[3].startswith("| udml_ss | 2 | 70.0 ± 14.1 |") and lines[3].endswith("| 60.0, 80.0 |")
    assert lines[4].startswith("| udml | 2 | 60.0 ± 14.1 |")


def test_throughput(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "throughput.json"
    args = ["--config", "omniglot_mini", "--iters", "2", "--rounds", "1", "--output", str(out)]
    assert throughput.main([*args, "num_clusters=32", "recluster_every=1", "pseudo_epochs=1", "num_workers=0"]) == 0
    doc = read(out)
    assert doc["ceiling_it_s"] > 0 and doc["udml_it_s"] > 0 and doc["recluster_s"] > 0 and has_machine_block(doc)
    assert doc["ratio"] == pytest.approx(doc["udml_it_s"] / doc["ceiling_it_s"]) and doc["backbone"] == "smallconv"
