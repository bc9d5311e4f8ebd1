import pytest
import torch
import torch.nn.functional as F

from udml.losses import LOSSES, create_loss, rotation_batch, rotation_loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_gives_a_finite_differentiable_scalar(name):
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(40, 16), dim=1).requires_grad_()
    labels = torch.arange(8).repeat_interleave(5)
    loss = create_loss(name)(emb, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_losses_prefer_embeddings_that_match_the_labels():
    torch.manual_seed(0)
    labels = torch.arange(8).repeat_interleave(5)
    centres = F.normalize(torch.randn(8, 32), dim=1)
    good = F.normalize(centres[labels] + 0.05 * torch.randn(40, 32), dim=1)
    bad = F.normalize(torch.randn(40, 32), dim=1)
    for name in ["multi_similarity", "contrastive", "triplet", "ntxent", "lifted_structure", "margin"]:
        loss = create_loss(name)
        assert loss(good, labels) < loss(bad, labels), name


def test_multi_similarity_uses_method_constants():
    loss = create_loss("multi_similarity")
    assert (loss.loss.alpha, loss.loss.beta, loss.loss.base) == (2.0, 40.0, 0.5)
    assert loss.miner.epsilon == 0.1


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="multi_similarity"):
        create_loss("arcfacez")


def test_rotation_batch_matches_naive_rotations():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rotated, labels = rotation_batch(x)
    assert rotated.shape == (8, 3, 4, 4)
    for j in range(8):
        k, i = labels[j].item(), j % 2
        img = x[i]
        for _ in range(k):  # k quarter turns counter-clockwise, one at a time
            img = img.transpose(1, 2).flip(1)
        assert torch.equal(rotated[j], img)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_rotation_loss_is_cross_entropy():
    logits = torch.randn(8, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert torch.allclose(rotation_loss(logits, labels), F.cross_entropy(logits, labels))


def test_loss_params_reach_the_loss_and_the_miner():
    loss = create_loss("multi_similarity", {"alpha": 3.0, "miner_epsilon": 0.3})
    assert loss.loss.alpha == 3.0 and loss.loss.beta == 40.0 and loss.miner.epsilon == 0.3
    loss = create_loss("triplet", {"margin": 0.2, "miner_type_of_triplets": "hard"})
    assert loss.loss.margin == 0.2 and loss.miner.margin == 0.1 and loss.miner.type_of_triplets == "hard"


@pytest.mark.parametrize(
    "name, params, named",
    [
        ("multi_similarity", {"alpah": 5}, "alpah"),
        ("multi_similarity", {"epsilon": 0.2}, "epsilon"),  # the miner's, without its miner_ prefix
        ("contrastive", {"miner_epsilon": 0.2}, "miner_epsilon"),  # contrastive has no miner
    ],
)
def test_mistyped_loss_params_are_errors_that_list_the_valid_ones(name, params, named):
    with pytest.raises(ValueError, match=f"{named} not a parameter of loss '{name}'; valid: "):
        create_loss(name, params)
