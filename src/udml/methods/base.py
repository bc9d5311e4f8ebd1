"""What every training method provides to the loop (udml.training)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoundTargets:
    """What a round trains towards: ``labels`` (pseudo-labels [N], or a neighbour table [N, M - 1]; the checkpoint
    keeps it and the next round receives it as ``previous``), ``keep`` (the images the batches may draw from; None:
    all), ``record`` (a line for metrics.jsonl, with its ``kind``; None: nothing to record) and ``summary`` (a line
    for the log; None: nothing to say)."""

    labels: torch.Tensor
    keep: torch.Tensor | None = None
    record: dict | None = None
    summary: str | None = None


class Method:
    """A training method: the round's targets, the sampler that forms batches from them, and the loss of a step.
    ``views``: how many crops of each image a batch holds (the sampler's ``views``); ``params``: its
    ``method_params`` with their defaults (udml.methods.PARAMS)."""

    name = ""
    views = 1

    def __init__(self, cfg):
        from . import method_params

        self.cfg = cfg
        self.params = method_params(cfg)

    def attach(self, s) -> None:
        """Called once the session (model, data) is built, before training or resuming."""

    def round_targets(self, s, previous: torch.Tensor | None, rnd: int) -> RoundTargets:
        raise NotImplementedError

    def sampler(self, s, targets: RoundTargets, num_batches: int, seed: int):
        raise NotImplementedError

    def begin_round(self, s, targets: RoundTargets) -> None:
        """Before the round's first step (e.g. put the labels on the device once)."""

    def loss(self, s, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The step's loss on batch ``x`` (images, or frozen-stage outputs with frozen_views) of images ``idx``, and
        its named terms (detached, for logging)."""
        raise NotImplementedError

    def after_step(self, s) -> None:
        """After the optimiser's step."""

    def state_dict(self) -> dict:
        """What the checkpoint keeps of the method beside the model (a teacher); {} for none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
