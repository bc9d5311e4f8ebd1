import pytest

from udml.config import FIELDS, Config, default_num_clusters, load_config, make_config, preset_names, save_config


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


def test_default_num_clusters_rule():
    assert default_num_clusters(5864) == 117  # CUB's training split: near the paper's 100
    assert default_num_clusters(50_000) == 1000
    assert default_num_clusters(100) == 16  # at least one batch's worth of clusters
    assert default_num_clusters(100, clusters_per_batch=4) == 4
    assert default_num_clusters(10_000_000) == 10_000
    assert make_config("folder").num_clusters is None
    with pytest.raises(ValueError, match="num_clusters is null"):
        make_config("folder").iterations_per_round()


def test_time_budget_values():
    from udml.config import parse_duration

    assert [parse_duration(v) for v in ("90", "90s", "20m", "20 min", "1.5h")] == [90, 90, 1200, 1200, 5400]
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(ValueError, match="is not a duration; write a positive number with a unit"):
            make_config("digits", [f"time_budget={bad}"])


@pytest.mark.parametrize("value", ["dsk", "memory", "2", "[disk]"])
def test_a_bad_cache_images_value_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"cache_images must be true .*false .*disk .*got"):
        make_config(None, [f"cache_images={value}"])


def test_cache_images_values(tmp_path):
    assert make_config(None, ["cache_images=disk"]).cache_images == "disk"
    assert make_config(None, ["cache_images=false"]).cache_images is False
    assert make_config(None, ["cache_images=true"]).cache_images is True
    assert make_config(None, {"cache_images": "Disk"}).cache_images == "disk"
