"""Training methods by name (``method: udml_ss`` or ``method: stml``), as losses are (udml.losses).

One loop (udml.training) trains with every method. Each round it asks the method for the round's targets (k-means
pseudo-labels, or a neighbour graph), draws the round's batches from the method's sampler, and for every step asks
the method for the loss, then lets it update its own state (a teacher). A method is one small class
(udml.methods.base.Method):

- ``udml_ss`` (udml.methods.udml_ss): UDML-SS, the paper's method, and with ``supervised=true`` its ceiling on the
  true labels;
- ``stml`` (udml.methods.stml): soft neighbourhood targets from a slowly moving teacher (STML).

``method_params`` holds the chosen method's own settings (PARAMS below); a mistyped one is an error that lists the
valid ones. docs/method.md describes both methods. This module imports no torch, so that a configuration is checked
before torch loads; the classes are imported when a run creates its method.
"""

from __future__ import annotations

import importlib

from ..errors import InputError

# Each method's settings (``method_params``) with their defaults.
PARAMS: dict[str, dict] = {
    "udml_ss": {},
    "stml": {
        "momentum": 0.999,  # the teacher's moving average: teacher <- momentum x teacher + (1 - momentum) x student
        "sigma": 3.0,  # the Gaussian kernel's width: exp(-distance^2 / sigma) on L2-normalised teacher embeddings
        "margin": 1.0,  # the relaxed contrastive loss's margin (delta), on relative distances
        "topk": None,  # nearest items within the batch for the contextual similarity; None: M x 2 views
        "wide_dim": 1024,  # the wide head's width (the teacher's target space, and self-distillation); None: no wide
        # head, the targets come from the embedding itself and there is no self-distillation
        "distill_weight": 1.0,  # weight of the self-distillation term
    },
}
CLASSES = {"udml_ss": "udml_ss:UDMLSS", "stml": "stml:STML"}  # module:class, imported by create_method


def method_params(cfg) -> dict:
    """The defaults of ``cfg.method`` with ``cfg.method_params`` over them; an unknown method or key is an error that
    lists the valid ones."""
    if cfg.method not in PARAMS:
        raise InputError(f"unknown method {cfg.method!r}; valid names are {', '.join(PARAMS)}")
    defaults = PARAMS[cfg.method]
    given = dict(cfg.method_params or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise InputError(f"method_params: {', '.join(unknown)} not a setting of method {cfg.method!r}; valid: {valid}")
    return {**defaults, **given}


def check_method(cfg) -> None:
    """ValueError naming the key and the fix when ``cfg``'s method settings do not hold together."""
    p = method_params(cfg)
    if cfg.method != "stml":
        return
    if not 0 <= p["momentum"] < 1:
        raise InputError(f"method_params.momentum must be in [0, 1), got {p['momentum']}")
    if not p["sigma"] > 0 or not p["margin"] > 0:
        raise InputError(f"method_params.sigma and margin must be positive, got {p['sigma']} and {p['margin']}")
    batch = cfg.clusters_per_batch * cfg.images_per_cluster * 2
    if p["topk"] is not None and not 2 <= p["topk"] <= batch:
        raise InputError(
            f"method_params.topk must be null (M x 2) or between 2 and the batch's {cfg.clusters_per_batch} x "
            f"{cfg.images_per_cluster} x 2 views = {batch}, got {p['topk']}"
        )
    if p["wide_dim"] is not None and p["wide_dim"] < 1:
        raise InputError(f"method_params.wide_dim must be null (no wide head) or positive, got {p['wide_dim']}")
    if cfg.supervised:
        raise InputError("supervised=true (the ceiling on the true labels) goes with method udml_ss, not stml")


def wide_dim(cfg) -> int | None:
    """The width of the extra head the method trains (UDMLNet.wide), or None."""
    return method_params(cfg).get("wide_dim")


def create_method(cfg):
    """The method object of ``cfg`` (udml.methods.base.Method)."""
    module, cls = CLASSES[cfg.method].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(cfg)


__all__ = ["CLASSES", "PARAMS", "check_method", "create_method", "method_params", "wide_dim"]
