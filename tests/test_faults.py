"""Faults during training lose nothing: a NaN loss stops the run with the last good checkpoint intact, a full
disk or unwritable folder leaves the previous checkpoint intact, and a run killed with SIGKILL at random
moments resumes to exactly the result of an uninterrupted run."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_errors import make_folder, tiny_config

from udml import checkpoint as ckpt
from udml import training
from udml.cli import main as cli_main
from udml.methods import udml_ss
from udml.training import NonFiniteError, train


def metrics_of(run: Path) -> list[dict]:
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return records


def same_state(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if not a[k].is_floating_point() else (a[k] - b[k]).abs().max() <= tol for k in a
    )


def same_records(a: list[dict], b: list[dict], tol: float = 1e-6) -> bool:
    """The same metrics.jsonl records in the same order, numbers within ``tol``; timings ignored."""

    def close(x, y):
        if isinstance(x, float) or isinstance(y, float):
            return isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= tol
        return x == y

    return len(a) == len(b) and all(
        r.keys() == q.keys() and all(close(r[k], q[k]) for k in r if k not in ("seconds", "elapsed_s"))
        for r, q in zip(a, b)
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), n_classes=3, per_class=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """An uninterrupted 3-round run."""
    tmp = tmp_path_factory.mktemp("reference")
    train(tiny_config(tmp, data, pseudo_epochs=3), tmp / "run")
    return tmp / "run"


# --------------------------------------------------------------------------- NaN / inf loss


@pytest.mark.parametrize("bad_step, poison", [(1, float("nan")), (3, float("inf"))])
def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, data, bad_step, poison):
    cfg = tiny_config(tmp_path, data, pseudo_epochs=4)
    assert cfg.iterations_per_round() == 1  # round r = step r
    original, calls = udml_ss.training_step, []

    def poisoned(*args, **kwargs):
        loss, parts = original(*args, **kwargs)
        calls.append(1)
        return (loss * poison if len(calls) == bad_step else loss), parts

    written = {}
    real_save = ckpt.atomic_save

    def recording_save(obj, path):
        real_save(obj, path)
        written[Path(path).name] = Path(path).read_bytes()

    monkeypatch.setattr(udml_ss, "training_step", poisoned)
    monkeypatch.setattr(ckpt, "atomic_save", recording_save)
    run = tmp_path / "run"
    kept = (
        r"no checkpoint was written yet"
        if bad_step == 1
        else rf"the last good checkpoint .*checkpoint.pt \(after round {bad_step - 1}\) is intact"
    )
    with pytest.raises(
        NonFiniteError,
        match=rf"NaN or infinite at step {bad_step} \(round {bad_step}\); training "
        rf"stopped and {kept}\. Lower lr",
    ):
        train(cfg, run)
    assert len(calls) == bad_step  # stopped at once: no further step
    assert not (run / "model.pt").exists()
    assert {r["round"] for r in metrics_of(run) if r["kind"] == "train"} == set(range(1, bad_step))
    if bad_step == 1:
        assert not (run / "checkpoint.pt").exists()
        return
    assert (run / "checkpoint.pt").read_bytes() == written["checkpoint.pt"]  # untouched since it was written
    state = ckpt.load(run / "checkpoint.pt")
    assert state["rounds_done"] == bad_step - 1 and state["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_huge_learning_rate_is_caught_before_a_useless_checkpoint(tmp_path, data):
    # One Adam step of size 1e30 leaves finite weights whose outputs overflow: no checkpoint may hold them.
    cfg = tiny_config(tmp_path, data, lr=1e30, pseudo_epochs=3)
    with pytest.raises(
        NonFiniteError,
        match=r"the weights or the network's outputs became NaN or infinite by step 1 "
        r"\(round 1\); training stopped and no checkpoint was written yet",
    ):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_blown_up_weights_are_caught_at_the_next_clustering(tmp_path, monkeypatch, data):
    # With checkpoint_every=2 the round-1 weights are not probed; the round-2 clustering finds them.
    cfg = tiny_config(tmp_path, data, pseudo_epochs=3, checkpoint_every=2)
    original = training.train_round

    def blow_up(s, *args, **kwargs):
        out = original(s, *args, **kwargs)
        with torch.no_grad():
            s.model.embedding.weight.fill_(float("inf"))
        return out

    monkeypatch.setattr(training, "train_round", blow_up)
    with pytest.raises(
        NonFiniteError,
        match=r"outputs on the training images are NaN or infinite after step 1 "
        r"\(at the clustering of round 2\); training stopped and no checkpoint",
    ):
        train(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- full disk, unwritable folder


def half_then_enospc(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 part of a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_previous_intact(folder: Path, before: bytes):
    assert (folder / "checkpoint.pt").read_bytes() == before
    assert ckpt.load(folder / "checkpoint.pt")["round"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt"]  # no temporary file left


FIX = r"the previous checkpoint there is intact. Free disk space or make the run folder writable"


def test_full_disk_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.atomic_save({"round": 1}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(ckpt.torch, "save", half_then_enospc)
    with pytest.raises(
        OSError,
        match=rf"could not write checkpoint .*checkpoint.pt \(No space left on device\); "
        rf"{FIX}",
    ) as info:
        ckpt.atomic_save({"round": 2}, tmp_path / "checkpoint.pt")
    assert info.value.errno == errno.ENOSPC
    assert_previous_intact(tmp_path, before)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_real_enospc_from_dev_full(tmp_path, monkeypatch):
    # The temporary file is /dev/full, where every write fails with ENOSPC from the kernel.
    ckpt.atomic_save({"round": 1}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(
        tempfile, "mkstemp", lambda **kw: (os.open("/dev/full", os.O_WRONLY), str(tmp_path / ".checkpoint.pt.x.tmp"))
    )
    with pytest.raises(OSError, match=rf"\(No space left on device\); {FIX}") as info:
        ckpt.atomic_save({"round": 2, "weights": torch.zeros(100_000)}, tmp_path / "checkpoint.pt")
    assert info.value.errno == errno.ENOSPC
    assert_previous_intact(tmp_path, before)


@pytest.mark.parametrize("where, code", [("mkstemp", errno.EACCES), ("replace", errno.EROFS)])
def test_unwritable_folder_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, code):
    # Tests may run as root, where chmod does not stop writes: the refusals are simulated.
    ckpt.atomic_save({"round": 1}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile if where == "mkstemp" else os, where, refuse)
    with pytest.raises(OSError, match=rf"could not write checkpoint .*\({os.strerror(code)}\); {FIX}") as info:
        ckpt.atomic_save({"round": 2}, tmp_path / "checkpoint.pt")
    assert info.value.errno == code
    monkeypatch.undo()
    assert_previous_intact(tmp_path, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder_for_real(tmp_path):
    ckpt.atomic_save({"round": 1}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError, match=FIX):
            ckpt.atomic_save({"round": 2}, tmp_path / "checkpoint.pt")
    finally:
        tmp_path.chmod(0o700)
    assert_previous_intact(tmp_path, before)


def test_full_disk_during_training_then_resume_matches(tmp_path, monkeypatch, data, reference):
    cfg = tiny_config(tmp_path, data, pseudo_epochs=3)
    real_save, calls = torch.save, []

    def second_save_fails(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint after round 2
            half_then_enospc(obj, f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    run = tmp_path / "run"
    with pytest.raises(
        OSError,
        match=rf"could not write checkpoint .*checkpoint.pt \(No space left on device\); "
        rf"{FIX}, then continue with --resume",
    ):
        train(cfg, run)
    monkeypatch.undo()
    assert ckpt.load(run / "checkpoint.pt")["rounds_done"] == 1
    assert not list(run.glob(".checkpoint.pt.*"))

    result = train(cfg, run, resume=True)
    ref = [r for r in metrics_of(reference) if r.get("final")][0]
    assert all(abs(result["final"]["embedding"][k] - ref[k]) <= 1e-6 for k in result["final"]["embedding"])
    assert same_state(ckpt.read_model(run / "model.pt")[1], ckpt.read_model(reference / "model.pt")[1])
    assert same_records(metrics_of(run), metrics_of(reference))


def test_resume_with_another_thread_count_warns(tmp_path, data, reference):
    run = tmp_path / "run"
    run.mkdir()
    state = ckpt.load(reference / "checkpoint.pt")
    state["cpu_threads"] = torch.get_num_threads() + 1
    ckpt.atomic_save(state, run / "checkpoint.pt")
    train(tiny_config(tmp_path, data, pseudo_epochs=3), run, resume=True)
    assert (
        f"written with {torch.get_num_threads() + 1} CPU threads and this process uses {torch.get_num_threads()}"
    ) in (run / "train.log").read_text()


def test_full_disk_message_on_the_command_line(tmp_path, monkeypatch, data, capsys):
    cfg = tiny_config(tmp_path, data)
    overrides = [
        f"{k}={json.dumps(v) if isinstance(v, list) else v}"
        for k, v in cfg.to_dict().items()
        if v is not None and k != "loss_params"
    ]
    monkeypatch.setattr(torch, "save", half_then_enospc)
    assert cli_main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert "udml train: error: [Errno 28] could not write checkpoint" in err and "Free disk space" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- SIGKILL at random moments

DIGITS = ["pseudo_epochs=10", "recluster_every=1", "num_workers=0", "eval_every=0", "device=cpu", "pictures=false"]
# One thread per process: CPU convolution gradients depend on the thread count, so every process of the
# comparison must use the same one; with one each, the two runs below share 2 cores without contention.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "udml", "train", *args], stdout=out, stderr=subprocess.STDOUT, env=ENV
        )


def wait_then_kill(proc: subprocess.Popen, run: Path, lines: int, delay: float, timeout: float = 60) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after metrics.jsonl has ``lines`` records and a checkpoint exists;
    False when it finished first."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").exists() and len(metrics_of(run)) >= lines:
            break
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path):
    out = tmp_path / "runs"
    # The uninterrupted run goes alongside the killed one (same thread count, so the same numbers).
    reference = launch(["--out", str(out), "run_name=reference", *DIGITS], tmp_path / "reference.log")
    run, log = out / "killed", tmp_path / "killed.log"
    rng = random.Random(0)
    # metrics.jsonl: 2 start records, then cluster + train per round (rounds 1-10), then the final evaluation.
    # The targets spread the kills over the run (0: while a resumed process starts up) and each adds a random
    # delay, so they land mid-clustering, mid-step, while writing a checkpoint or after the last one.
    targets = [4, 0, 10, 15, 20, 22]
    moments = []
    proc = launch(["--out", str(out), "run_name=killed", *DIGITS], log)
    for target in targets:
        killed = wait_then_kill(proc, run, target, rng.uniform(0.0, 0.6))
        assert killed or proc.returncode == 0, log.read_text()[-3000:]
        if not killed:
            break
        state = ckpt.load(run / "checkpoint.pt")  # always loadable
        assert state["config"]["seed"] == 0 and 1 <= state["rounds_done"] <= 10
        moments.append((target, state["rounds_done"], len(metrics_of(run))))
        proc = launch(["--resume", str(run)], log)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert reference.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    print("kills at (target, checkpoint round, metrics records):", moments)
    assert len(moments) >= 5 and len({m[1:] for m in moments}) >= 4, moments  # spread over the run
    assert log.read_text().count("resumed from") >= 5

    ref, got = metrics_of(out / "reference"), metrics_of(run)
    assert same_records(got, ref)  # no duplicates, no gaps, same values: losses, cluster statistics, metrics
    assert ref[-1].get("final") and got[-1].get("final")
    assert same_state(ckpt.read_model(run / "model.pt")[1], ckpt.read_model(out / "reference" / "model.pt")[1])
    assert not list(run.glob(".checkpoint.pt.*.tmp"))
