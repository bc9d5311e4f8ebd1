"""The closing summary and the schedule estimate."""

import pytest

from udml.report import ScheduleClock, format_duration, summary


def metrics(r1, nmi, mapr):
    return {"recall@1": r1, "recall@2": min(1.0, r1 + 0.05), "nmi": nmi, "map@r": mapr}


def test_summary_shows_start_final_and_change():
    start = {"embedding": metrics(0.50, 0.40, 0.10), "pooled": metrics(0.60, 0.50, 0.20)}
    lines, worse = summary(start, metrics(0.70, 0.55, 0.25))
    text = "\n".join(lines)
    assert worse is None
    assert "start (pooled)" in text and "final (embedding)" in text
    change = next(line for line in lines if line.startswith("change vs start (pooled)"))
    assert change.split()[4:] == ["+10.00", "+10.00", "+5.00", "+5.00"]  # R@1 R@2 NMI MAP@R


def test_summary_says_plainly_when_training_made_things_worse():
    # the user's report: final R@1 92.2 vs 92.8 pooled, NMI 88.7 vs 91.0
    start = {"embedding": metrics(0.90, 0.85, 0.5), "pooled": metrics(0.928, 0.910, 0.6)}
    _, worse = summary(start, metrics(0.922, 0.887, 0.61))
    assert worse.startswith("WORSE THAN THE START")
    assert "pooled features (R@1 -0.60, NMI -2.30)" in worse and "MAP@R" not in worse
    assert "untrained network's" in worse and "train longer" in worse
    assert summary(start, None)[1] is None  # no final evaluation, nothing to compare
    # a pretrained start: the advice is its own features, not more minutes (issue #19's CPU runs)
    _, worse = summary(start, metrics(0.922, 0.887, 0.61), pretrained=True)
    assert "pretrained network's pooled features" in worse and "udml embed pretrained:" in worse
    assert "train longer" not in worse


def test_schedule_clock_estimate():
    clock = ScheduleClock(rounds=10, iterations_per_round=30, evaluations=3)
    clock.eval_seconds, clock.cluster_seconds = 20.0, 5.0
    clock.step_seconds = 2.0
    assert clock.total_seconds() == pytest.approx(10 * 30 * 2 + 10 * 5 + 5 * 20)
    assert clock.rounds_within(1800) == (1800 - 40) // (30 * 2 + 5)
    assert not clock.timed_steps(0) and format_duration(3725) == "1 h 02 min" and format_duration(65) == "1 min 05 s"
