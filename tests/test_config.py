import pytest

from udml.config import FIELDS, Config, load_config, make_config, preset_names, save_config


def test_presets_load_and_follow_the_recipe():
    assert {"digits", "cub", "cub_lite0"} <= set(preset_names())
    cub = make_config("cub")
    assert (cub.backbone, cub.image_size, cub.num_clusters, cub.embedding_dim) == ("googlenet", 227, 100, 512)
    assert (cub.lr, cub.weight_decay, cub.rotation_weight, cub.pseudo_epochs) == (1e-5, 5e-4, 0.1, 600)
    assert cub.loss == "multi_similarity" and cub.freeze_bn
    # ~30 iterations per clustering, ~120 clusterings: about 3,600 iterations in all
    assert cub.iterations_per_round() == 31 and cub.num_rounds() == 120
    lite = make_config("cub_lite0")
    assert lite.backbone == "efficientnet_lite0"
    assert {k: v for k, v in lite.to_dict().items() if k != "backbone"} == {
        k: v for k, v in cub.to_dict().items() if k != "backbone"
    }


def test_overrides_are_parsed_as_yaml():
    cfg = make_config("cub", ["lr=1e-4", "recall_ks=[1, 10]", "freeze_bn=false", "num_clusters=50"])
    assert cfg.lr == 1e-4 and cfg.recall_ks == [1, 10] and cfg.freeze_bn is False and cfg.num_clusters == 50


def test_unknown_key_lists_valid_keys():
    with pytest.raises(KeyError) as e:
        make_config(None, ["learning_rate=1"])
    assert "learning_rate" in str(e.value) and "lr" in str(e.value) and "num_clusters" in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(FileNotFoundError, match="cub_lite0"):
        make_config("imagenet")


@pytest.mark.parametrize(
    "override,match",
    [
        ("num_clusters=1", "at least 2"),
        ("lr=abc", "not a valid float"),
        ("clusters_per_batch=200", "cannot exceed num_clusters"),
    ],
)
def test_bad_values_are_rejected(override, match):
    with pytest.raises(ValueError, match=match):
        make_config("cub", [override])


def test_config_round_trips_through_yaml(tmp_path):
    cfg = make_config("cub_lite0", ["seed=3"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert set(cfg.to_dict()) == set(FIELDS) and isinstance(cfg, Config)
