"""The training loop, one for every method (udml.methods): the round's targets -> its batches -> steps, repeat.

Read from the top: ``train`` opens the run folder (or resumes it), builds the session (udml.session) and runs
the rounds; ``run_round`` is the method's targets (UDML-SS: a clustering, udml.pseudolabels; STML: a neighbour
graph) / train the steps / evaluate if due / checkpoint if due; ``train_round`` runs the steps, each the method's
loss, a backward pass, the optimiser's step and the method's own update; ``finish`` writes the final evaluation,
the model file and the pictures. The time budget and progress reporting come last."""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import RUNTIME_FIELDS, Config, parse_duration, save_config, validate
from .data import make_loader
from .devices import resolve_device
from .errors import NonFiniteError
from .inference import extract
from .logs import progress_bar_drawn, setup_logging
from .methods.base import RoundTargets
from .plots import write_run_pictures
from .report import ScheduleClock, format_duration, format_metrics, summary
from .rundir import (
    CHECKPOINT,
    MetricsFile,
    RunDir,
    check_same_configuration,
    default_run_name,
    new_run_dir,
    remove_temporaries,
)
from .samplers import GroupBatchSampler
from .session import Session, evaluate_model, prepare, prepare_views, resolve_num_clusters

log = logging.getLogger("udml")


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's random numbers: the initial weights, then each round's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Progress:
    """Where a run stands; what a checkpoint restores."""

    rounds_done: int = 0
    step: int = 0
    labels: torch.Tensor | None = None  # the last round's targets: pseudo-labels, or STML's neighbour table
    start_metrics: dict = dataclasses.field(default_factory=dict)
    saved_round: int | None = None  # the round the checkpoint on disk holds


@dataclass
class Loop:
    """What the rounds share: the run folder, the metrics file, the sampler and its loader, the clock, the bar."""

    run: RunDir | None  # None on the non-main processes of a torchrun job
    metrics: MetricsFile
    clock: ScheduleClock
    bar: tqdm
    sampler: GroupBatchSampler | None = None
    loader: torch.utils.data.DataLoader | None = None
    targets: RoundTargets | None = None  # the round's, from the method
    deadline: float | None = None  # time.time() by which the whole run must be done (time_budget)
    stopped: bool = False  # the time budget ended training before the schedule did


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train by ``cfg.method``; returns {"start": metrics, "final": metrics, "run_dir": path, "step": steps}.

    The loop of DeepCluster's main: start or resume, then per round cluster, train, evaluate and checkpoint,
    then finish (final evaluation, model file, summary, pictures)."""
    validate(cfg)
    started = time.time()
    device = distributed.init(resolve_device(cfg.device))  # joins the torchrun process group, if any
    run, state = open_run(cfg, run_dir, resume)
    cfg = resolve_num_clusters(cfg)
    if run is not None:
        save_config(cfg, run.config)
    seed_all(cfg.seed)  # the network's initial weights
    s = prepare(cfg, device)
    progress = start_or_resume(s, run, state)
    loop = Loop(
        run,
        MetricsFile(run.metrics if run else None, started),
        ScheduleClock(cfg.num_rounds(), cfg.iterations_per_round(), evaluations_between(s)),
        tqdm(
            total=cfg.num_rounds() * cfg.iterations_per_round(),
            initial=progress.step,
            desc="train",
            unit="it",
            dynamic_ncols=True,
            disable=None if run else True,
            mininterval=2.0,
        ),
        deadline=started + parse_duration(cfg.time_budget) if cfg.time_budget else None,
    )
    progress_bar_drawn(not loop.bar.disable)
    if state is None:
        loop.metrics.truncate_after(-1)
        evaluate_start(s, loop, progress)
    else:
        loop.metrics.truncate_after(progress.rounds_done)
    if cfg.frozen_views and progress.rounds_done < cfg.num_rounds():
        t = time.time()
        prepare_views(s)
        log.info(
            "frozen_views: %d views of each training image computed once (%.1fs)", cfg.frozen_views, time.time() - t
        )
    for rnd in range(progress.rounds_done + 1, cfg.num_rounds() + 1):
        loop.stopped = loop.stopped or over_budget(s, loop, loop.clock.cluster_seconds)  # a clustering must fit
        if loop.stopped:
            break
        run_round(s, loop, progress, rnd)
    loop.bar.close()
    # Training is over: end the loader's persistent workers before the final evaluation and the pictures start
    # loaders of their own, so that no two sets of workers (each holding pages copied from this process) coexist.
    loop.loader = loop.sampler = None
    if loop.stopped:
        log.info(
            "time budget %s: training stopped at step %d of %d, leaving time for the final evaluation and model",
            cfg.time_budget,
            progress.step,
            cfg.num_rounds() * cfg.iterations_per_round(),
        )
    return finish(s, loop, progress)


def open_run(cfg: Config, run_dir: Path | None, resume: bool) -> tuple[RunDir | None, dict | None]:
    """The run folder (made by the main process and shared with the others; None for them), its logging, and
    with ``resume`` the checkpoint's state (checked against ``cfg``)."""
    main = distributed.is_main()  # under torchrun only the main process writes files and logs
    path = None
    if main:
        path = (
            Path(run_dir)
            if run_dir is not None
            else new_run_dir(cfg.out_dir, cfg.run_name, default_run_name(cfg.dataset, cfg.backbone))
        )
        path.mkdir(parents=True, exist_ok=True)
    run = RunDir(distributed.broadcast_object(str(path) if main else None))
    setup_logging(run.path if main else None, quiet=not main, resume=resume)
    if main:
        remove_temporaries(run.checkpoint)  # left by a process killed while writing a checkpoint
    state = None
    if resume:
        state = ckpt.read_checkpoint(run.checkpoint, keys=("config",))
        # a changed configuration is the likelier mistake: said first. A key the checkpoint lacks was added to udml
        # after it was written, with a default that keeps the earlier behaviour.
        saved = {**Config().to_dict(), **state["config"]}
        check_same_configuration(cfg.to_dict(), saved, run.checkpoint, ignore=RUNTIME_FIELDS)
        ckpt.check_checkpoint(state, run.checkpoint)
    return (run if main else None), state


def start_or_resume(s: Session, run: RunDir | None, state: dict | None) -> Progress:
    """A fresh start, or the model, optimiser and progress of the checkpoint."""
    cfg = s.cfg
    log.info(
        "run folder %s | device %s%s | %d train / %d test images | K=%d | %d rounds x %d iterations",
        run,
        s.device,
        f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else "",
        len(s.aug),
        0 if s.test_labels is None else len(s.test_labels),
        cfg.num_clusters,
        cfg.num_rounds(),
        cfg.iterations_per_round(),
    )
    if state is None:
        return Progress()
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.method.load_state_dict(state.get("method_state") or {})
    progress = Progress(
        state["rounds_done"], state["step"], state["labels"], state["start_metrics"], saved_round=state["rounds_done"]
    )
    log.info(
        "resumed from %s after round %d (step %d)", run.checkpoint if run else "", progress.rounds_done, progress.step
    )
    threads = state.get("cpu_threads")
    if s.device.type == "cpu" and threads not in (None, torch.get_num_threads()):
        # CPU convolution gradients are summed in a thread-count dependent order.
        log.warning(
            "the checkpoint was written with %d CPU threads and this process uses %d: the resumed "
            "run will differ from an uninterrupted one by rounding; set OMP_NUM_THREADS=%d for an "
            "exact replay",
            threads,
            torch.get_num_threads(),
            threads,
        )
    return progress


def evaluate_start(s: Session, loop: Loop, progress: Progress) -> None:
    t = time.time()
    progress.start_metrics = evaluate_model(s, with_pooled=True)
    loop.clock.eval_seconds = time.time() - t
    for kind, m in progress.start_metrics.items():
        loop.metrics.append(kind="eval", round=0, step=0, features=kind, seconds=loop.clock.eval_seconds, **m)
        log.info("start  (%-9s) %s", kind, format_metrics(m))


def run_round(s: Session, loop: Loop, progress: Progress, rnd: int) -> None:
    """Round ``rnd``: cluster (or, for the supervised ceiling, take the true labels), train, evaluate when due,
    checkpoint when due."""
    round_seed = s.cfg.seed * 1_000_003 + rnd
    seed_all(round_seed)
    keep = pseudo_labels(s, loop, progress, rnd)
    train_steps(s, loop, progress, rnd, keep, round_seed)
    evaluate_if_due(s, loop, progress, rnd)
    checkpoint_if_due(s, loop, progress, rnd)
    progress.rounds_done = rnd


def pseudo_labels(s: Session, loop: Loop, progress: Progress, rnd: int) -> torch.Tensor | None:
    """The round's targets from the method (a clustering, the true labels, a neighbour graph): sets
    ``progress.labels`` and returns the mask of the images the batches draw from (confident_fraction), or None for
    all."""
    cfg, t = s.cfg, time.time()
    try:
        targets = s.method.round_targets(s, progress.labels, rnd)
    except NonFiniteError as e:  # weights blown up by the last steps, loss still finite
        raise non_finite(
            progress, loop.run, f"{e} after step {progress.step} (at the clustering of round {rnd})"
        ) from None
    progress.labels = targets.labels
    loop.targets = targets
    if targets.record is None:
        return targets.keep
    loop.metrics.append(round=rnd, step=progress.step, seconds=time.time() - t, **targets.record)
    loop.clock.cluster_seconds = loop.clock.cluster_seconds or time.time() - t
    rounds = cfg.num_rounds()
    if targets.summary and (rnd == 1 or rnd == rounds or rnd % max(1, rounds // 10) == 0):
        log.info("round %d/%d %s (%.1fs)", rnd, rounds, targets.summary, time.time() - t)
    return targets.keep


def train_steps(s: Session, loop: Loop, progress: Progress, rnd: int, keep, round_seed: int) -> None:
    """The round's steps over P x M batches of the pseudo-labels (of the images in ``keep``, or all), stopped
    early by the time budget."""
    cfg = s.cfg
    if loop.sampler is None:
        loop.sampler = s.method.sampler(s, loop.targets, cfg.iterations_per_round(), round_seed)
        workers = 0 if s.views is not None else s.workers  # cached views are read from memory, no decoding
        loop.loader = make_loader(
            s.train_set(), batch_sampler=loop.sampler, num_workers=workers, device=s.device, persistent=True
        )
    loop.sampler.reset(progress.labels.numpy(), seed=round_seed, keep=None if keep is None else keep.numpy())
    t = time.time()
    loop.clock.round_started(progress.step)
    first_step = progress.step
    progress.step, means, bad = train_round(
        s,
        loop.loader,
        loop.targets,
        progress.step,
        loop.bar,
        progress=functools.partial(report_progress, s, loop, rnd),
        stop=(lambda: over_budget(s, loop, loop.clock.step_seconds or 0.0)) if loop.deadline else None,
    )
    loop.stopped = progress.step - first_step < cfg.iterations_per_round() and bad < 0
    if bad >= 0:
        raise non_finite(progress, loop.run, f"the loss became NaN or infinite at step {bad} (round {rnd})")
    loop.metrics.append(
        kind="train",
        round=rnd,
        step=progress.step,
        seconds=time.time() - t,
        iterations=cfg.iterations_per_round(),
        **means,
    )
    loop.bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k.endswith("loss")}, refresh=False)


def train_round(s: Session, loader, targets, step: int, bar=None, progress=None, stop=None):
    """One pass of the loader; returns (step, mean of each named loss term over the round, first bad step).

    ``targets``: the round's (udml.methods.RoundTargets; a tensor of pseudo-labels is taken as such). Non-finite
    losses are tracked on the device (no host sync per step) and reported as the first bad step, or -1; on the
    CPU the round stops at the first one. ``progress(step)`` is called after every step; the round ends early when
    ``stop()`` says so before a step (the time budget)."""
    if isinstance(targets, torch.Tensor):
        targets = RoundTargets(targets)
    method = s.method
    method.begin_round(s, targets)
    sums, steps = {}, torch.zeros((), device=s.device)
    bad_step = torch.full((), -1, dtype=torch.long, device=s.device)
    s.model.train()
    for x, idx in loader:
        if stop is not None and stop():
            break
        x = x.to(s.device, non_blocking=True)
        loss, terms = method.loss(s, x, idx)
        step += 1
        finite = torch.isfinite(loss)
        bad_step = torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, step))
        if s.device.type == "cpu" and distributed.any_true(~finite, s.device):  # every process stops together
            break
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        method.after_step(s)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value
        steps += 1
        if bar is not None:
            bar.update(1)
        if progress is not None:
            progress(step)
    names = sorted(sums)
    # the processes' rotation terms differ; their metric losses do not. One host sync for the round.
    totals = distributed.sum_over_ranks(torch.stack([sums[n] for n in names] + [steps])) if names else None
    means = {} if totals is None else dict(zip(names, (totals[:-1] / totals[-1].clamp_min(1)).tolist()))
    return step, means, int(distributed.max_over_ranks(bad_step))


def evaluate_if_due(s: Session, loop: Loop, progress: Progress, rnd: int) -> None:
    """Every ``eval_every`` rounds (the last round's evaluation is finish()'s), when the time budget allows."""
    cfg = s.cfg
    due = cfg.eval_every and rnd % cfg.eval_every == 0 and rnd != cfg.num_rounds() and s.test_labels is not None
    if not due or loop.stopped or over_budget(s, loop, loop.clock.eval_seconds):
        return
    t = time.time()
    m = evaluate_model(s, with_pooled=False).get("embedding")
    if m is not None:
        loop.metrics.append(
            kind="eval", round=rnd, step=progress.step, features="embedding", seconds=time.time() - t, **m
        )
        log.info("step %6d (embedding) %s", progress.step, format_metrics(m))


def checkpoint_if_due(s: Session, loop: Loop, progress: Progress, rnd: int) -> None:
    """Every ``checkpoint_every`` rounds, after the last one and when the time budget stopped training; never
    a checkpoint whose network yields NaN."""
    cfg = s.cfg
    if not (rnd % max(1, cfg.checkpoint_every) == 0 or rnd == cfg.num_rounds() or loop.stopped):
        return
    if not model_is_finite(s):
        raise non_finite(
            progress,
            loop.run,
            f"the weights or the network's outputs became NaN or infinite by step {progress.step} (round {rnd})",
        )
    if loop.run is not None:
        ckpt.save_checkpoint(
            loop.run.checkpoint,
            s.model,
            s.optimizer,
            rounds_done=rnd,
            step=progress.step,
            labels=progress.labels,
            config=cfg.to_dict(),
            start_metrics=progress.start_metrics,
            method_state=s.method.state_dict(),
        )
    progress.saved_round = rnd


def model_is_finite(s: Session, probe_images: int = 16) -> bool:
    """Finite weights, and finite embeddings of the first training images (weights can be finite but so large
    that the outputs overflow). Changes no state: eval mode, no gradients, no random numbers."""
    if not all(bool(torch.isfinite(p).all()) for p in s.model.parameters()):
        return False
    data = s.train_plain
    n = min(probe_images, len(data))
    x = data[:n] if isinstance(data, torch.Tensor) else torch.stack([data[i][0] for i in range(n)])
    _, emb = extract(s.model, x, batch_size=n, amp=s.cfg.amp, pooled=False)
    return bool(torch.isfinite(emb).all())


def non_finite(progress: Progress, run: RunDir | None, what: str) -> NonFiniteError:
    kept = (
        "no checkpoint was written yet"
        if progress.saved_round is None
        else f"the last good checkpoint {run.checkpoint if run else CHECKPOINT} (after round {progress.saved_round}) "
        "is intact"
    )
    return NonFiniteError(
        f"{what}; training stopped and {kept}. Lower lr (or head_lr), raise weight_decay or "
        "check the data, then start a new run: resuming with the same settings repeats the "
        "same steps"
    )


def finish(s: Session, loop: Loop, progress: Progress) -> dict:
    """Final evaluation, the model file, the summary and the pictures."""
    t = time.time()
    kept = {}
    final = evaluate_model(s, with_pooled=False, keep=kept)
    result = {
        "start": progress.start_metrics,
        "final": final,
        "step": progress.step,
        "run_dir": str(loop.run) if loop.run else None,
    }
    if loop.run is None:
        return {**result, "start": {}, "final": {}}
    if final:
        loop.metrics.append(
            kind="eval",
            round=s.cfg.num_rounds(),
            step=progress.step,
            features="embedding",
            final=True,
            seconds=time.time() - t,
            **final["embedding"],
        )
    ckpt.save_model(s.model, s.cfg, loop.run.model)
    table, worse = summary(progress.start_metrics, final.get("embedding"), pretrained=s.cfg.pretrained)
    for line in table:
        log.info("%s", line)
    if worse:
        log.warning("%s", worse)
    log.info("model written to %s; metrics in %s", loop.run.model, loop.run.metrics)
    if s.cfg.pictures:
        write_run_pictures(
            loop.run.path,
            s.model,
            s.train_plain if s.test_labels is None else s.test_plain,
            s.test_labels,
            class_names=s.test_classes,
            batch_size=s.cfg.eval_batch_size,
            num_workers=s.workers,
            amp=s.cfg.amp,
            embeddings=kept.get("embeddings"),  # the final evaluation's: no second pass over the test images
        )
    return result


def evaluations_between(s: Session) -> int:
    """Evaluations between the start and the final one."""
    if s.test_labels is None or not s.cfg.eval_every:
        return 0
    return (s.cfg.num_rounds() - 1) // s.cfg.eval_every


def over_budget(s: Session, loop: Loop, upcoming: float) -> bool:
    """With a time budget: whether ``upcoming`` seconds of work, then the closing evaluation, model file and
    pictures (timed by the start evaluation), would end past the deadline. Every process decides alike."""
    if loop.deadline is None:
        return False
    late = time.time() + upcoming + closing_seconds(s, loop.clock) > loop.deadline
    return distributed.any_true(late, s.device) if distributed.world_size() > 1 else late


def closing_seconds(s: Session, clock: ScheduleClock) -> float:
    """About how long finish() takes: the final evaluation, and with pictures one more embedding pass and a t-SNE."""
    return clock.eval_seconds * (2 if s.cfg.pictures else 1) + (10.0 if s.cfg.pictures else 2.0)


def report_progress(s: Session, loop: Loop, rnd: int, step: int) -> None:
    """After a training step: the schedule's estimated duration once, then a progress line now and then."""
    clock = loop.clock
    if clock.timed_steps(step):
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)  # the steps were only queued
        total = clock.estimate(step)
        log.info(
            "estimated duration of the whole schedule: %s (%d rounds x %d iterations at %.2f s each, %d "
            "clusterings at %.1f s, %d evaluations at %.1f s)",
            format_duration(total),
            clock.rounds,
            clock.iterations,
            clock.step_seconds,
            clock.rounds,
            clock.cluster_seconds,
            clock.evaluations + 2,
            clock.eval_seconds,
        )
        if loop.deadline is not None:
            log.info("%s", budget_plan(s, loop, step))
        elif s.device.type == "cpu" and total > 3600:
            rounds = clock.rounds_within(1800)
            log.warning(
                "that is over an hour on the CPU. To shorten it: pseudo_epochs=%d (about 30 min at this "
                "speed; now %d), a smaller crop (image_size=160), eval_every=0 (no evaluations in between), "
                "or train on a GPU (device=cuda)",
                rounds * s.cfg.recluster_every,
                s.cfg.pseudo_epochs,
            )
    line = clock.progress_line(step, rnd)
    if line:
        log.info("%s", line, extra={"progress": True})


def budget_plan(s: Session, loop: Loop, step: int) -> str:
    """What fits in the time budget at the measured speeds."""
    clock, cfg = loop.clock, s.cfg
    left = loop.deadline - time.time() - closing_seconds(s, clock)
    per_step = clock.step_seconds + clock.cluster_seconds / clock.iterations  # a clustering every round
    total = cfg.num_rounds() * cfg.iterations_per_round()
    fit = min(total, step + max(0, int(left // per_step)))
    if fit >= total:
        return f"time budget {cfg.time_budget}: the whole schedule fits ({format_duration(clock.total_seconds())})"
    return (
        f"time budget {cfg.time_budget}: about {fit} of the schedule's {total} steps and {-(-fit // clock.iterations)} "
        f"clusterings fit; training stops then, leaving {format_duration(closing_seconds(s, clock))} for the "
        "final evaluation and model"
    )
