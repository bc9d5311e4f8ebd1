import json

import pytest
import torch

from udml import checkpoint as ckpt
from udml.cli import main as cli
from udml.config import make_config
from udml.inference import load_model
from udml.losses import create_loss
from udml.methods.udml_ss import StepSettings, training_step
from udml.models import model_from_config
from udml.rundir import CHECKPOINT, METRICS, MODEL
from udml.training import train

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


def test_rotation_weight_zero_switches_the_rotation_task_off():
    cfg = make_config("digits", ["rotation_weight=0"])
    model = model_from_config(cfg).train()
    x = torch.randint(0, 256, (80, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(16).repeat_interleave(5)
    loss, terms = training_step(model, create_loss(cfg.loss), x, y, StepSettings.of(cfg))
    loss.backward()
    assert list(terms) == ["metric_loss"] and all(p.grad is None for p in model.rotation.parameters())
    cfg = make_config("digits", ["rotation_weight=0.5"])
    loss, terms = training_step(model, create_loss(cfg.loss), x, y, StepSettings.of(cfg))
    assert loss.item() == pytest.approx(terms["metric_loss"].item() + 0.5 * terms["rotation_loss"].item(), rel=1e-5)
    assert 0 <= terms["rotation_accuracy"] <= 1


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


def test_time_budget_values():
    from udml.config import parse_duration

    assert [parse_duration(v) for v in ("90", "90s", "20m", "20 min", "1.5h")] == [90, 90, 1200, 1200, 5400]
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(ValueError, match="is not a duration; write a positive number with a unit"):
            make_config("digits", [f"time_budget={bad}"])


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
