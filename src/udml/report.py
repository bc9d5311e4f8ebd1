"""What a run prints: metric lines, the closing summary, and how long the schedule will take."""

from __future__ import annotations

import time

NAMES = {"nmi": "NMI", "map@r": "MAP@R"}
# The metrics that the closing summary compares (Recall@1 and the two that see the whole ranking or clustering).
HEADLINE = ("recall@1", "nmi", "map@r")


def metric_keys(m: dict) -> list[str]:
    return [k for k in m if k.startswith("recall@")] + [k for k in ("nmi", "map@r") if k in m]


def format_metrics(m: dict) -> str:
    return "  ".join(f"{NAMES.get(k, 'R@' + k[7:])} {100 * m[k]:5.2f}" for k in metric_keys(m))


def summary(start: dict, final: dict | None, pretrained: bool = False) -> tuple[list[str], str | None]:
    """The closing table (start rows, final row, change of the final embedding against each start row) and a
    warning when the trained embedding is worse than the start on any headline metric, or None.

    ``start``: {"embedding": metrics, "pooled": metrics} of the network before training; ``final``: the trained
    embedding's metrics; ``pretrained``: the network started from pretrained weights (the advice differs)."""
    rows = [(f"start ({kind})", m) for kind, m in start.items() if m]
    if final:
        rows.append(("final (embedding)", final))
    if not rows:
        return [], None
    keys = metric_keys(rows[-1][1])
    width = max(len(name) for name, _ in rows) + 12
    lines = [" " * width + "".join(f"{NAMES.get(k, 'R@' + k[7:]):>8}" for k in keys)]
    lines += [f"{name:<{width}}" + "".join(f"{100 * m[k]:8.2f}" for k in keys) for name, m in rows]
    if not final:
        return lines, None
    worse = []
    for kind, m in start.items():
        if not m:
            continue
        lines.append(
            f"{'change vs start (' + kind + ')':<{width}}" + "".join(f"{100 * (final[k] - m[k]):+8.2f}" for k in keys)
        )
        lost = [
            f"{NAMES.get(k, 'R@' + k[7:])} {100 * (final[k] - m[k]):+.2f}"
            for k in HEADLINE
            if k in m and k in final and final[k] < m[k]
        ]
        if lost:
            network = "pretrained" if pretrained else "untrained"
            worse.append(f"the {network} network's {kind} features ({', '.join(lost)})")
    warning = None
    if worse:
        warning = (
            "WORSE THAN THE START: on the test images the trained embedding is below "
            + " and below ".join(worse)
            + ". Training did not help here: "
            + (
                "use the pretrained backbone's own features (udml embed pretrained:NAME), or train on a GPU; on a "
                "CPU, longer runs of a pretrained backbone did not do better (benchmarks/RESULTS.md, issue #19)."
                if pretrained
                else "train longer or on a GPU (see the time estimate at the start of the run)."
            )
        )
    return lines, warning


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


class ScheduleClock:
    """Estimates the whole schedule's duration from the start evaluation, the first clustering and the first
    training steps (steps x time per step + clusterings x time per clustering + evaluations x time per
    evaluation), and gives a progress line every ``every`` seconds, for logs that are not a terminal.
    """

    ESTIMATE_AFTER = 10  # training steps timed before the estimate

    def __init__(self, rounds: int, iterations_per_round: int, evaluations: int, every: float = 60.0):
        self.rounds, self.iterations, self.evaluations, self.every = rounds, iterations_per_round, evaluations, every
        self.total_steps = rounds * iterations_per_round
        self.eval_seconds = 0.0
        self.cluster_seconds = 0.0
        self.step_seconds: float | None = None
        self._round_start = self._last_line = time.time()
        self._round_step = 0

    def round_started(self, step: int) -> None:
        self._round_start, self._round_step = time.time(), step

    def timed_steps(self, step: int) -> bool:
        """True once, when enough steps of this process were timed for the estimate (call ``estimate`` then)."""
        done = step - self._round_step
        return self.step_seconds is None and done >= min(self.ESTIMATE_AFTER, self.iterations)

    def estimate(self, step: int) -> float:
        """Record the time per step (call after the device finished the steps) and return the total seconds."""
        self.step_seconds = (time.time() - self._round_start) / max(1, step - self._round_step)
        return self.total_seconds()

    def total_seconds(self) -> float:
        return (
            self.total_steps * (self.step_seconds or 0.0)
            + self.rounds * self.cluster_seconds
            + (2 + self.evaluations) * self.eval_seconds
        )  # start, in between, final

    def rounds_within(self, seconds: float) -> int:
        """How many rounds fit in ``seconds`` at the measured speeds (at least 1)."""
        per_round = self.iterations * (self.step_seconds or 0.0) + self.cluster_seconds
        left = seconds - 2 * self.eval_seconds
        return max(1, int(left // per_round)) if per_round > 0 else self.rounds

    def progress_line(self, step: int, round_: int) -> str | None:
        """'step s/S ...' when ``every`` seconds passed since the last one, else None."""
        now = time.time()
        if now - self._last_line < self.every:
            return None
        self._last_line = now
        left = ""
        if self.step_seconds is not None:
            left = f", about {format_duration((self.total_steps - step) * self.step_seconds)} of training steps left"
        return (
            f"step {step}/{self.total_steps} ({100 * step / max(1, self.total_steps):.0f} %), round {round_}/"
            f"{self.rounds}{left}"
        )
