"""The training methods (udml.methods): UDML-SS's step, and STML's targets, losses and teacher against naive loop
references, with the properties the method relies on."""

import math

import pytest
import torch
import torch.nn.functional as F

from udml.config import make_config
from udml.losses import create_loss, distillation_loss, relative_distances, relaxed_contrastive_loss
from udml.methods.stml import contextual_neighbours, moving_average, stml_targets
from udml.methods.udml_ss import StepSettings, training_step
from udml.models import model_from_config


def batch(n_images=10, views=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_images, dim, generator=g)
    t = torch.cat([centres + 0.3 * torch.randn(n_images, dim, generator=g) for _ in range(views)])
    ids = torch.arange(n_images).repeat(views)
    return t, ids


def naive_targets(t, ids, sigma, topk):
    """The description in the method's text, one pair at a time."""
    t = F.normalize(t.double(), dim=1)
    n = len(t)
    sem = [[math.exp(-float(((t[i] - t[j]) ** 2).sum()) / sigma) for j in range(n)] for i in range(n)]
    score = [[2.0 if ids[i] == ids[j] else sem[i][j] for j in range(n)] for i in range(n)]
    order = [sorted(range(n), key=lambda j: -score[i][j]) for i in range(n)]
    top = [set(o[:topk]) for o in order]
    mutual = [{j for j in top[i] if i in top[j]} for i in range(n)]
    overlap = [
        [len(mutual[i] & mutual[j]) / len(mutual[i]) if j in mutual[i] else 0.0 for j in range(n)] for i in range(n)
    ]
    half = (topk + 1) // 2
    expanded = [[sum(overlap[q][j] for q in order[i][:half]) / half for j in range(n)] for i in range(n)]
    ctx = [[(expanded[i][j] + expanded[j][i]) / 2 for j in range(n)] for i in range(n)]
    return torch.tensor([[(sem[i][j] + ctx[i][j]) / 2 for j in range(n)] for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("sigma, topk, seed", [(3.0, 10, 0), (1.0, 4, 1), (0.5, 7, 2)])
def test_targets_match_the_naive_reference(sigma, topk, seed):
    t, ids = batch(seed=seed)
    got = stml_targets(t, ids, sigma, topk)
    torch.testing.assert_close(got.double(), naive_targets(t, ids, sigma, topk), rtol=0, atol=1e-5)


def test_targets_are_in_0_1_and_symmetric_and_views_are_neighbours():
    for seed in range(5):
        t, ids = batch(n_images=12, views=2, seed=seed)
        w = stml_targets(t, ids, 3.0, 10)
        assert bool((w >= 0).all() and (w <= 1).all())
        torch.testing.assert_close(w, w.t(), rtol=0, atol=0)
        _, mutual = contextual_neighbours(t, ids, 10)
        same = ids[:, None] == ids[None, :]
        assert bool(mutual[same].all())  # an image's views (and itself) are always mutual neighbours
        assert bool((w[same] > w[~same].mean()).all())


def naive_relative(e):
    n = len(e)
    d = [[float(torch.dist(e[i], e[j])) if i != j else 0.0 for j in range(n)] for i in range(n)]
    return [[d[i][j] / (sum(d[i]) / (n - 1)) for j in range(n)] for i in range(n)]


def test_relaxed_contrastive_loss_and_its_gradient_match_a_loop():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, 9, generator=g, dtype=torch.float64)
    w = (w + w.t()) / 2
    loss = relaxed_contrastive_loss(e, w, margin=1.0)
    n = len(e)
    total = 0
    for i in range(n):
        mean_i = sum(torch.dist(e[i], e[k]) for k in range(n) if k != i) / (n - 1)
        for j in range(n):
            if i != j:
                d = torch.dist(e[i], e[j]) / mean_i
                total = total + w[i, j] * d**2 + (1 - w[i, j]) * torch.clamp(1.0 - d, min=0) ** 2
    reference = total / (n * (n - 1))
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, e)
    (ref_grad,) = torch.autograd.grad(reference, e)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(relative_distances(e.detach()), torch.tensor(naive_relative(e.detach())).double())


def test_relaxed_contrastive_loss_is_finite_for_coinciding_rows():
    e = torch.zeros(4, 3, requires_grad=True)
    loss = relaxed_contrastive_loss(e, torch.full((4, 4), 0.5))
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(e.grad).all())


def test_distillation_matches_a_loop_and_leaves_the_wide_head_alone():
    g = torch.Generator().manual_seed(4)
    narrow = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    wide = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(narrow, wide)
    dn, dw = naive_relative(narrow.detach()), naive_relative(wide.detach())
    n, kl = len(narrow), 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        zq = sum(math.exp(-dn[i][j]) for j in others)
        zp = sum(math.exp(-dw[i][j]) for j in others)
        for j in others:
            p, q = math.exp(-dw[i][j]) / zp, math.exp(-dn[i][j]) / zq
            kl += p * math.log(p / q)
    assert float(loss) == pytest.approx(kl / n, rel=1e-6)
    loss.backward()
    assert narrow.grad is not None and float(narrow.grad.abs().sum()) > 0
    assert wide.grad is None  # the wide side is the target


def test_moving_average_step_is_exact():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher[0].bias.data.copy_(student[0].bias.data)  # a weight the student has not changed
    student(torch.randn(8, 4))  # BatchNorm statistics and its counter move
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    moving_average(teacher, student, 0.99)
    for k, t in teacher.state_dict().items():
        s, t0 = student.state_dict()[k], before[k]
        if t.is_floating_point():
            assert torch.equal(t, t0 + 0.01 * (s - t0)), k
        else:
            assert torch.equal(t, s), k
    assert torch.equal(teacher[0].bias, student[0].bias)  # unchanged weights stay bit for bit


QUICK = ["pseudo_epochs=4", "recluster_every=2", "num_workers=0", "pictures=false", "method=stml"]
QUICK += ["method_params={wide_dim: 32, momentum: 0.9}", "clusters_per_batch=8", "images_per_cluster=4"]


def test_stml_trains_resumes_exactly_and_keeps_its_teacher_in_the_checkpoint(tmp_path):
    from udml import checkpoint as ckpt
    from udml.config import make_config
    from udml.inference import load_model
    from udml.training import train

    full = train(make_config("digits", QUICK + ["run_name=full", f"out_dir={tmp_path}"]))
    part_cfg = make_config("digits", QUICK + ["run_name=part", f"out_dir={tmp_path}"])
    state_cfg = {**part_cfg.to_dict(), "pseudo_epochs": 2}
    train(make_config(None, state_cfg))  # the first of the two rounds, as if killed after it
    part = tmp_path / "part"
    state = ckpt.load(part / "checkpoint.pt")
    assert state["rounds_done"] == 1 and "teacher" in state["method_state"]
    assert not all(torch.equal(state["method_state"]["teacher"][k], v) for k, v in state["model"].items())
    state["config"]["pseudo_epochs"] = 4
    ckpt.atomic_save(state, part / "checkpoint.pt")
    resumed = train(part_cfg, run_dir=part, resume=True)
    assert resumed["step"] == full["step"]
    for k, v in full["final"]["embedding"].items():
        assert resumed["final"]["embedding"][k] == pytest.approx(v, abs=1e-6), k
    a, b = (ckpt.load(d / "checkpoint.pt")["method_state"]["teacher"] for d in (tmp_path / "full", part))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # the model file has no wide head and loads without the training configuration
    model = load_model(part / "model.pt")
    assert model.wide is None and model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 128)


def test_no_gradient_reaches_the_teacher(tmp_path):
    from udml.config import make_config
    from udml.data import make_loader
    from udml.session import prepare

    s = prepare(make_config("digits", QUICK), torch.device("cpu"))
    teacher = s.method.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    targets = s.method.round_targets(s, None, 1)
    loader = make_loader(s.aug, batch_sampler=s.method.sampler(s, targets, 1, seed=0))
    x, idx = next(iter(loader))
    assert len(x) == 2 * 8 * 4 and torch.equal(idx[:32], idx[32:])  # two views of each image
    loss, terms = s.method.loss(s, x, idx)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None for p in s.model.wide.parameters())
    s.optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # only the moving average moves it
    s.method.after_step(s)
    assert not all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_unknown_method_settings_are_named():
    from udml.config import make_config

    with pytest.raises(ValueError, match="method_params: sigmaa not a setting of method 'stml'; valid: momentum"):
        make_config("digits", ["method=stml", "method_params={sigmaa: 1}"])
    with pytest.raises(ValueError, match="unknown method 'stlm'; valid names are udml_ss, stml"):
        make_config("digits", ["method=stlm"])
    with pytest.raises(ValueError, match="supervised=true .* goes with method udml_ss"):
        make_config("digits", ["method=stml", "supervised=true"])


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
