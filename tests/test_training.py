import json

import pytest
import torch
from conftest import CUB_CLASSES, cub_photos

from udml import checkpoint as ckpt
from udml.cli import main
from udml.cli import main as cli
from udml.config import default_num_clusters, load_config, make_config
from udml.inference import load_model
from udml.models import model_from_config
from udml.rundir import CHECKPOINT, METRICS, MODEL
from udml.training import train

CLASSES = CUB_CLASSES
QUICK = ["pseudo_epochs=4", "recluster_every=2", "num_workers=0", "pictures=false"]


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / METRICS).read_text().splitlines()) if r["kind"] == kind]


def test_default_job_writes_a_run_folder(tmp_path, capsys):
    assert cli(["train", "--config", "digits", "--out", str(tmp_path), "run_name=r", *QUICK, "pictures=true"]) == 0
    out = capsys.readouterr().out
    assert "start  (embedding) R@1" in out and "NMI" in out
    assert "estimated duration of the whole schedule" in out
    table = out[out.index("final (embedding)") :]
    assert "change vs start (embedding)" in table and "change vs start (pooled)" in table
    run = tmp_path / "r"
    # train.log holds every printed line, after a line that marks the start
    log_text = (run / "train.log").read_text()
    assert "===== udml train started" in log_text
    printed = [line for line in out.splitlines() if line.strip()]
    assert printed and [line for line in printed if line not in log_text] == []
    for name in (
        "config.yaml",
        METRICS,
        CHECKPOINT,
        MODEL,
        "train.log",
        "curves.png",
        "retrieval.png",
        "embeddings.png",
    ):
        assert (run / name).is_file(), name
    evals = records(run, "eval")
    cfg = make_config("digits", QUICK)
    assert [e["step"] for e in evals if e["features"] == "embedding"] == [0, 2 * cfg.iterations_per_round()]
    assert {"recall@1", "recall@8", "nmi", "map@r"} <= set(evals[-1])
    clusters = records(run, "cluster")
    assert len(clusters) == 2 and clusters[1]["nmi_previous"] is not None
    assert all(c["empty"] == 0 for c in clusters)
    # the inference file loads without the training configuration and embeds like the trained model
    model = load_model(run / MODEL)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    state = ckpt.load(run / CHECKPOINT)
    trained = model_from_config(make_config("digits"))
    trained.load_state_dict(state["model"])
    assert torch.allclose(model(x), trained.eval()(x), atol=1e-6)
    # udml evaluate on the saved model reproduces the run's final evaluation
    assert cli(["evaluate", str(run), "--dataset", "digits", "-o", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    final = next(e for e in evals if e.get("final"))
    for key in ("recall@1", "recall@8", "map@r", "nmi"):
        assert again[key] == pytest.approx(final[key], abs=1e-6), key


def test_resume_continues_and_reaches_the_same_result(tmp_path):
    full = train(make_config("digits", QUICK + ["run_name=full", f"out_dir={tmp_path}"]))
    cfg = make_config(
        "digits",
        [
            "pseudo_epochs=2",
            "recluster_every=2",
            "num_workers=0",
            "pictures=false",
            "run_name=part",
            f"out_dir={tmp_path}",
        ],
    )
    train(cfg)  # the first half: one round, as if the run had been stopped after it
    part = tmp_path / "part"
    state = ckpt.load(part / CHECKPOINT)
    assert state["rounds_done"] == 1
    resumed_cfg = make_config("digits", QUICK + ["run_name=part", f"out_dir={tmp_path}"])
    # the schedule differs from the checkpoint's: refused, with the fix in the message
    with pytest.raises(ValueError, match="different configuration.*pseudo_epochs"):
        train(resumed_cfg, run_dir=part, resume=True)
    state["config"]["pseudo_epochs"] = 4  # same run, longer schedule: what a killed 4-epoch run leaves behind
    ckpt.atomic_save(state, part / CHECKPOINT)
    resumed = train(resumed_cfg, run_dir=part, resume=True)
    assert resumed["step"] == full["step"]
    for k, v in full["final"]["embedding"].items():
        assert resumed["final"]["embedding"][k] == pytest.approx(v, abs=1e-6), k
    assert [r["round"] for r in records(part, "cluster")] == [1, 2]
    log_text = (part / "train.log").read_text()
    assert log_text.count("===== udml train started") == 1
    assert log_text.count("===== udml train --resume") == 2  # the refused resume, then the one that ran


@pytest.mark.slow
def test_udml_ss_on_omniglot_beats_its_own_start(tmp_path, omniglot_root):
    """Real data from ../shared, from scratch on CPU: the trained embedding must retrieve better than the start."""
    cfg = make_config(
        None,
        [
            "dataset=omniglot",
            f"data_root={omniglot_root}",
            "backbone=smallconv",
            "pretrained=false",
            "freeze_bn=false",
            "image_size=28",
            "resize_size=28",
            "hflip=false",
            "crop_scale_min=0.6",
            "embedding_dim=128",
            "num_clusters=300",
            "lr=1e-3",
            "rotation_weight=0.5",
            "pseudo_epochs=6",
            "recluster_every=3",
            "recall_ks=[1, 2, 4, 8]",
            "pictures=false",
            f"out_dir={tmp_path}",
            "run_name=omni",
        ],
    )
    result = train(cfg)
    start, final = result["start"]["embedding"], result["final"]["embedding"]
    assert final["recall@1"] > start["recall@1"] + 0.05, (start, final)


def test_supervised_ceiling_trains_on_the_true_labels(tmp_path):
    result = train(
        make_config(
            "digits", QUICK + ["supervised=true", "clusters_per_batch=5", "run_name=sup", f"out_dir={tmp_path}"]
        )
    )
    run = tmp_path / "sup"
    assert records(run, "cluster") == []  # no clustering at all
    assert len(records(run, "train")) == 2 and result["step"] > 0


def test_a_time_budget_stops_training_cleanly_with_a_finished_model(tmp_path, udml_log):
    """A schedule far too long for the budget: training stops at a step boundary with time left for the final
    evaluation; the run folder holds a checkpoint and a model like any finished run, and the run resumes."""
    import time

    budget = 12
    overrides = ["pseudo_epochs=100000", "recluster_every=5", "num_workers=0", "pictures=false", "device=cpu"]
    cfg = make_config("digits", overrides + [f"time_budget={budget}s", f"out_dir={tmp_path}", "run_name=b"])
    t = time.time()
    result = train(cfg)
    wall = time.time() - t
    total = cfg.num_rounds() * cfg.iterations_per_round()
    assert 0 < result["step"] < total
    assert wall <= budget * 1.25 + 3, wall  # the closing evaluation was planned for, within its timing's noise
    assert f"time budget {budget}s: about" in udml_log.text and "training stopped at step" in udml_log.text
    run = tmp_path / "b"
    assert (run / MODEL).exists() and load_model(run / MODEL) is not None
    final = [r for r in records(run, "eval") if r.get("final")]
    assert len(final) == 1 and final[0]["step"] == result["step"]
    saved = ckpt.load(run / CHECKPOINT)
    assert saved["step"] == result["step"]
    # resumed with another budget, it goes on from the checkpoint's step
    again = train(make_config(None, {**cfg.to_dict(), "time_budget": "6s"}), run_dir=run, resume=True)
    assert again["step"] > result["step"]


def test_training_loader_workers_end_before_the_final_evaluation(tmp_path, monkeypatch):
    """The training loader's persistent workers are gone when the final evaluation and the pictures start their own
    loaders (issue #19: two sets of workers at once put the whole CUB run's tree PSS over 4 GB)."""
    import multiprocessing

    from udml import training

    seen = {}
    finish = training.finish

    def spy(s, loop, progress):
        seen["workers"] = len(multiprocessing.active_children())
        return finish(s, loop, progress)

    monkeypatch.setattr(training, "finish", spy)
    overrides = ["pseudo_epochs=2", "recluster_every=1", "num_workers=2", "pictures=false", f"out_dir={tmp_path}"]
    steps = []
    original = training.train_round

    def counting(s, loader, *args, **kwargs):
        steps.append(len(multiprocessing.active_children()))  # the persistent workers, while training
        return original(s, loader, *args, **kwargs)

    monkeypatch.setattr(training, "train_round", counting)
    train(make_config("digits", overrides))
    assert steps and steps[-1] >= 1  # the test would see nothing if the training loader had no workers
    assert seen["workers"] == 0


@pytest.mark.slow
def test_train_on_an_unlabelled_folder(tmp_path, cub3, capsys):
    """`udml train --data DIR`: the folder preset, K from N, a damaged file skipped, no evaluation, pictures."""
    data = tmp_path / "photos"
    (data / "2019" / "trip").mkdir(parents=True)
    for i, f in enumerate(sorted((cub3 / CLASSES[1]).iterdir())[:40]):
        (data / ("2019/trip" if i % 2 else "") / f"img{i}.jpg").write_bytes(f.read_bytes())
    (data / "damaged.jpg").write_bytes(b"\xff\xd8 truncated")
    small = [
        "backbone=smallconv",
        "pretrained=false",
        "freeze_bn=false",
        "image_size=32",
        "resize_size=36",
        "embedding_dim=32",
        "clusters_per_batch=4",
        "pseudo_epochs=5",
        "lr=1e-3",
        "num_workers=0",
        "cache_images=false",
        "freeze_stages=0",  # the CPU variant (folder_cpu) freezes Lite0's stages; smallconv has none
        "run_name=r",
    ]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--device", "cpu", *small]) == 0
    run = tmp_path / "runs" / "r"
    cfg = load_config(run / "config.yaml")
    assert cfg.dataset == "folder" and cfg.num_clusters == default_num_clusters(40, 4) == 4
    log = (run / "train.log").read_text()
    assert "damaged.jpg" in log and "not evaluated" in log and "40 train / 0 test images" in log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"cluster", "train"}
    for name in ("model.pt", "curves.png", "retrieval.png", "embeddings.png"):
        assert (run / name).is_file(), name

    # with a labelled test folder the run is evaluated
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "runs"),
                "--device",
                "cpu",
                *small[:-1],
                f"test_root={cub3}",
                "run_name=r2",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "runs" / "r2" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and 0 < final[0]["recall@1"] <= 1


@pytest.mark.slow
def test_a_vision_transformer_trains_with_frozen_blocks_and_cached_views(tmp_path):
    """A downloadable backbone (DINO ViT-S/16, random weights here) with its first 10 blocks frozen and their outputs
    for one view of each image cached: the run trains the last 2 blocks and writes a model that udml.load embeds
    with."""
    import udml

    photos = cub_photos(tmp_path / "photos", CUB_CLASSES, 4)
    run = [
        "train",
        "--data",
        str(photos),
        "--config",
        "folder",
        "--out",
        str(tmp_path),
        "run_name=vit",
        "backbone=dino_vits16",
        "pretrained=false",
        "embedding_dim=null",
        "freeze_stages=10",
        "frozen_views=1",
        "num_clusters=3",
        "clusters_per_batch=3",
        "images_per_cluster=2",
        "rotation_images=2",
        "pseudo_epochs=2",
        "recluster_every=1",
        "num_workers=0",
        "pictures=false",
        "device=cpu",
    ]
    assert main(run) == 0
    metrics = [json.loads(line) for line in (tmp_path / "vit" / METRICS).read_text().splitlines()]
    assert [m["kind"] for m in metrics].count("train") == 2
    vectors = udml.load(tmp_path / "vit").embed(sorted(photos.glob("*/*.jpg"))[:2])
    assert vectors.shape == (2, 384)
