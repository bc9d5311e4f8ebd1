"""udml.checkpoint: model files and checkpoints are read as tensors and plain data (a file whose unpickling would run
code is refused with a clear error, and runs nothing), and an older checkpoint is explained and can be upgraded."""

import os

import numpy as np
import pytest
import torch

import udml
from udml import checkpoint as ckpt
from udml.checkpoint import save_model
from udml.cli import main
from udml.config import make_config
from udml.models import model_from_config


class RunsCode:
    """Unpickling this calls os.system: what a malicious model file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    cfg = make_config("digits", ["embedding_dim=16"])
    good = tmp_path / "good.pt"
    save_model(model_from_config(cfg), cfg, good)
    state = torch.load(good, weights_only=True)
    marker = tmp_path / "code_ran"
    state["payload"] = RunsCode(marker)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path, marker


def test_a_file_that_would_run_code_is_refused(evil):
    path, marker = evil
    with pytest.raises(ValueError, match="could run code hidden in the file"):
        ckpt.load(path)
    with pytest.raises(ValueError, match="not loaded"):
        udml.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["export", "evaluate", "embed"])
def test_the_command_line_refuses_it_too(evil, tmp_path, command, capsys):
    path, marker = evil
    argv = {
        "export": ["export", str(path), "-o", str(tmp_path / "m.onnx")],
        "evaluate": ["evaluate", str(path), "--dataset", "digits"],
        "embed": ["embed", str(path), str(tmp_path), "-o", str(tmp_path / "e.npz")],
    }[command]
    assert main(argv) == 2
    assert "could run code hidden in the file" in capsys.readouterr().err
    assert not marker.exists()


def test_an_older_checkpoint_is_explained_and_can_be_upgraded(tmp_path):
    cfg = make_config("digits", ["embedding_dim=16"])
    model = model_from_config(cfg)
    old = {
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "rounds_done": 1,
        "step": 3,
        "labels": torch.zeros(4, dtype=torch.long),
        "centroids": torch.zeros(2, 16),
        "rng": {"numpy": np.random.get_state()},
    }  # what udml < 0.2 wrote
    path = tmp_path / "checkpoint.pt"
    torch.save(old, path)
    with pytest.raises(ValueError, match=f"python -m udml.checkpoint upgrade {path}"):
        ckpt.load(path)
    assert ckpt.upgrade(path) == ["rng", "centroids"]
    state = ckpt.load(path)
    assert state["step"] == 3 and "rng" not in state
    torch.testing.assert_close(state["model"], model.state_dict())
