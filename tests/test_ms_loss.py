"""udml.ms_loss against pytorch-metric-learning's MultiSimilarityMiner + MultiSimilarityLoss (values and gradients),
and the host-device synchronisations of the loss and of a whole training step, counted with torch.profiler."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from torch.profiler import ProfilerActivity, profile

from udml.losses import create_loss
from udml.ms_loss import MultiSimilarityLoss, MultiSimilarityMiner

PARAMS = {"alpha": 2.0, "beta": 40.0, "base": 0.5}
# operators that make the host wait for the device on a GPU (a scalar read, or an output whose size depends on data)
SYNC_OPS = {
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
}


def pml(emb, labels, epsilon=0.1, **params):
    pairs = miners.MultiSimilarityMiner(epsilon=epsilon)(emb, labels)
    return losses.MultiSimilarityLoss(**{**PARAMS, **params})(emb, labels, pairs)


def udml(emb, labels, epsilon=0.1, **params):
    pairs = MultiSimilarityMiner(epsilon=epsilon)(emb, labels)
    return MultiSimilarityLoss(**{**PARAMS, **params})(emb, labels, pairs)


def value_and_grad(fn, emb, labels, **kw):
    emb = emb.detach().clone().requires_grad_()
    loss = fn(emb, labels, **kw)
    loss.backward()
    return loss.detach(), emb.grad


def assert_matches_pml(emb, labels, **kw):
    want, want_grad = value_and_grad(pml, emb, labels, **kw)
    got, got_grad = value_and_grad(udml, emb, labels, **kw)
    assert got.shape == want.shape == ()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-5)
    return got, got_grad


def batch(p, m, dim=32, seed=0, spread=1.0):
    """P clusters x M embeddings, grouped cluster by cluster as the sampler gives them, not normalised: unit
    centres plus noise of norm about ``spread`` (0.5: mostly easy pairs, 2: mostly hard)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(p, dim, generator=g), dim=1)
    labels = torch.arange(p).repeat_interleave(m)
    noise = torch.randn(p * m, dim, generator=g) * (1 + torch.rand(p * m, 1, generator=g)) / dim**0.5
    return centres[labels] + spread * noise, labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "p, m, spread", [(16, 5, 0.5), (16, 5, 1.0), (16, 5, 3.0), (8, 4, 1.0), (4, 2, 1.0), (32, 5, 1.0)]
)
def test_matches_pml_on_p_x_m_batches(seed, p, m, spread):
    emb, labels = batch(p, m, seed=seed, spread=spread)
    loss, grad = assert_matches_pml(emb, labels)
    assert loss > 0 and grad.abs().max() > 0  # pairs were mined: the comparison is not 0 == 0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n, classes", [(40, 5), (80, 30), (7, 3), (64, 64), (50, 1)])
def test_matches_pml_on_random_labels(seed, n, classes):
    g = torch.Generator().manual_seed(100 + seed)
    emb = torch.randn(n, 16, generator=g)
    labels = torch.randint(classes, (n,), generator=g)
    assert_matches_pml(emb, labels)


@pytest.mark.parametrize(
    "epsilon, params", [(0.0, {}), (0.5, {}), (1.0, {"alpha": 3.0, "beta": 10.0, "base": 0.2}), (0.1, {"beta": 50.0})]
)
def test_matches_pml_with_other_parameters(epsilon, params):
    emb, labels = batch(16, 5, seed=7, spread=1.0)
    assert_matches_pml(emb, labels, epsilon=epsilon, **params)


def test_batch_without_a_positive_pair_is_zero_with_a_zero_gradient():
    emb = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    loss, grad = assert_matches_pml(emb, torch.arange(20))  # every label distinct
    assert loss == 0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("n", [2, 5, 80])
def test_one_cluster_has_no_negative_and_is_zero(n):
    emb = torch.randn(n, 8, generator=torch.Generator().manual_seed(2))
    loss, grad = assert_matches_pml(emb, torch.zeros(n, dtype=torch.long))
    assert loss == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_a_single_mined_pair_of_each_kind_gives_zero_as_pml_does():
    # two anchors of one class and a third item: pml keeps at most one positive and one negative pair per
    # direction; with <= 1 of each in total it returns 0
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]])
    for labels in (torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])):
        assert_matches_pml(emb, labels, epsilon=0.1)
        assert_matches_pml(emb, labels, epsilon=5.0)


def test_ties_and_duplicates():
    # integer-valued embeddings: many exactly equal similarities, duplicates inside and across clusters
    g = torch.Generator().manual_seed(3)
    emb = torch.randint(-1, 2, (40, 3), generator=g).float()
    emb[emb.abs().sum(1) == 0] = 1.0  # no zero vector (its cosine similarity is 0 with everything in both)
    emb[5] = emb[0]
    labels = torch.arange(8).repeat_interleave(5)
    for epsilon in (0.0, 0.1, 0.5):
        assert_matches_pml(emb, labels, epsilon=epsilon)
    # anchors whose hardest negative ties with the easiest positive +- epsilon exactly
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert_matches_pml(emb, torch.tensor([0, 0, 1, 1, 2]), epsilon=0.0)


def test_without_a_miner_every_pair_counts_as_in_pml():
    emb, labels = batch(8, 4, seed=4, spread=1.0)
    want, want_grad = value_and_grad(lambda e, y: losses.MultiSimilarityLoss(**PARAMS)(e, y), emb, labels)
    got, got_grad = value_and_grad(lambda e, y: MultiSimilarityLoss(**PARAMS)(e, y), emb, labels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-5)


def test_create_loss_default_is_udml_and_pml_stays_reachable():
    emb, labels = batch(16, 5, seed=5, spread=1.0)
    default, reference = create_loss("multi_similarity"), create_loss("multi_similarity_pml")
    assert isinstance(default.loss, MultiSimilarityLoss) and isinstance(reference.loss, losses.MultiSimilarityLoss)
    torch.testing.assert_close(default(emb, labels), reference(emb, labels), rtol=0, atol=1e-5)
    tuned = create_loss("multi_similarity", {"miner_epsilon": 0.3, "beta": 20.0})
    assert tuned.miner.epsilon == 0.3 and tuned.loss.beta == 20.0
    torch.testing.assert_close(tuned(emb, labels), pml(emb, labels, epsilon=0.3, beta=20.0), rtol=0, atol=1e-5)


def test_across_processes_outside_torchrun_is_the_loss():
    emb, labels = batch(16, 5, seed=6, spread=1.0)
    loss = create_loss("multi_similarity")
    torch.testing.assert_close(loss.across_processes()(emb, labels), loss(emb, labels), rtol=0, atol=0)


# --------------------------------------------------------------------------- host-device synchronisations


def count_syncs(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key in SYNC_OPS}


def forward_backward(loss_name):
    emb, labels = batch(16, 5, seed=8, spread=1.0)
    emb.requires_grad_()
    loss = create_loss(loss_name)
    return lambda: loss(emb, labels).backward()


def test_the_loss_makes_no_host_device_sync_and_pml_does():
    assert count_syncs(forward_backward("multi_similarity")) == {}
    pml_syncs = count_syncs(forward_backward("multi_similarity_pml"))  # the counter sees them
    assert sum(pml_syncs.values()) > 0, pml_syncs


def test_a_training_step_makes_no_host_device_sync():
    from udml.config import make_config
    from udml.methods.udml_ss import StepSettings, training_step
    from udml.models import model_from_config

    torch.manual_seed(0)
    cfg = make_config("digits", ["device=cpu"])
    model = model_from_config(cfg)
    p, m = cfg.clusters_per_batch, cfg.images_per_cluster
    x = torch.randn(p * m, 3, cfg.image_size, cfg.image_size)
    y = torch.arange(p).repeat_interleave(m)
    metric_loss = create_loss(cfg.loss, cfg.loss_params)

    def step():
        loss, _ = training_step(model, metric_loss, x, y, StepSettings.of(cfg))
        loss.backward()

    step()  # warm-up outside the profile
    assert "rotation_loss" in training_step(model, metric_loss, x, y, StepSettings.of(cfg))[1]
    assert count_syncs(step) == {}
