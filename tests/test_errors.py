"""Every bad input named in the reliability issue raises a clear error: the right type, and a message that
names the problem (what, where) and the fix."""

import dataclasses
import logging

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from udml import checkpoint as ckpt
from udml import errors
from udml.config import RUNTIME_FIELDS, Config, make_config
from udml.data import ImageDataset
from udml.datasets import ImageSet, load_split
from udml.evaluation import evaluate, knn
from udml.images import open_rgb
from udml.losses import create_loss
from udml.models import create_backbone
from udml.rundir import check_same_configuration, new_run_dir
from udml.samplers import ClusterBatchSampler
from udml.training import train

# --------------------------------------------------------------------------- fixtures


def make_folder(root, n_classes=3, per_class=4, size=12, identical=False):
    """root/c<k>/<i>.png: distinct colours per class (or one image copied everywhere)."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if identical:
                a = np.full((size, size, 3), 128, np.uint8)
            else:
                a = np.clip(rng.normal(60 * c + 40, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


def tiny_config(tmp_path, data_root, **overrides) -> Config:
    """A from-scratch run on a folder of a few 12 px images: seconds on a CPU."""
    values = dict(
        dataset="folder",
        data_root=str(data_root),
        test_root=str(data_root),
        backbone="smallconv",
        pretrained=False,
        freeze_bn=False,
        image_size=12,
        resize_size=12,
        crop_scale_min=0.5,
        hflip=False,
        embedding_dim=8,
        rotation_hidden=8,
        num_clusters=3,
        clusters_per_batch=2,
        images_per_cluster=2,
        rotation_images=2,
        lr=1e-3,
        pseudo_epochs=1,
        recluster_every=1,
        epoch_images_per_cluster=2,
        recall_ks=[1, 2],
        kmeans_backend="torch",
        num_workers=0,
        pictures=False,
        device="cpu",
        out_dir=str(tmp_path / "runs"),
        run_name="run",
        eval_every=0,
    )
    values.update(overrides)
    return make_config(None, values)


def make_cub(root, n_train=2, n_test=1, per_class=2):
    rels = []
    for c in [*range(1, n_train + 1), *range(101, 101 + n_test)]:
        for i in range(per_class):
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (c, c, c)).save(root / "images" / rel)
            rels.append((rel, c))
    (root / "images.txt").write_text("".join(f"{k} {r}\n" for k, (r, _) in enumerate(rels, 1)))
    (root / "image_class_labels.txt").write_text("".join(f"{k} {c}\n" for k, (_, c) in enumerate(rels, 1)))
    return root


# --------------------------------------------------------------------------- data sets


@pytest.mark.parametrize("name", ["cub", "cars196", "sop", "inshop", "omniglot", "folder"])
def test_missing_data_directory(tmp_path, name):
    missing = tmp_path / "not_there"
    with pytest.raises(FileNotFoundError, match=r"not_there.*(does not exist|not a folder).*expected"):
        load_split(name, missing, "train")


def test_missing_data_directory_through_train(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "not_there")
    with pytest.raises(FileNotFoundError, match=r"not_there does not exist.*expected a folder of images"):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt"])
def test_cub_missing_metadata_file(tmp_path, missing):
    make_cub(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing} is missing; expected layout: .*images.txt"):
        load_split("cub", tmp_path, "train", strict=False)


@pytest.mark.parametrize(
    "file, line, message",
    [
        (
            "images.txt",
            "2 a.jpg extra",
            r"images.txt:2: expected 2 whitespace-separated fields, got 3.*expected layout",
        ),
        ("images.txt", "two 001.Bird_1/Bird_1_1.jpg", r"images.txt:2: image id must be an integer, got 'two'"),
        ("image_class_labels.txt", "2 999", r"image_class_labels.txt:2: class id must be in 1..200, got 999"),
        ("image_class_labels.txt", "2", r"image_class_labels.txt:2: expected 2 whitespace-separated fields"),
    ],
)
def test_cub_malformed_metadata_file(tmp_path, file, line, message):
    make_cub(tmp_path)
    lines = (tmp_path / file).read_text().splitlines()
    lines[1] = line
    (tmp_path / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_split("cub", tmp_path, "train", strict=False)


def test_cub_partial_copy_is_refused_with_the_way_out(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(ValueError, match=r"expected 5,864 images.*found 4 images.*pass strict=False"):
        load_split("cub", tmp_path, "train")


def test_other_official_layouts_with_malformed_metadata(tmp_path):
    sop = tmp_path / "sop"
    sop.mkdir()
    (sop / "Ebay_train.txt").write_text("id class super path\n1 1 1 bicycle_final/a.JPG\n")
    with pytest.raises(
        ValueError,
        match=r"Ebay_train.txt:1: expected the header 'image_id class_id "
        r"super_class_id path'.*expected layout",
    ):
        load_split("sop", sop, "train", strict=False)

    inshop = tmp_path / "inshop"
    inshop.mkdir()
    (inshop / "list_eval_partition.txt").write_text("3\nimage_name item_id evaluation_status\nimg/a.jpg id_1 train\n")
    with pytest.raises(ValueError, match=r"declares 3 images but 1 rows follow; the file is truncated"):
        load_split("inshop", inshop, "train", strict=False)

    cars = tmp_path / "cars"
    cars.mkdir()
    scipy.io.savemat(cars / "cars_annos.mat", {"something_else": np.zeros(3)})
    with pytest.raises(ValueError, match=r"cars_annos.mat: no struct array 'annotations'.*expected layout"):
        load_split("cars196", cars, "train", strict=False)
    (cars / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match=r"cars_annos.mat: cannot be read as a MATLAB file"):
        load_split("cars196", cars, "train", strict=False)


def test_data_set_with_zero_images(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no images found under .*empty with the extensions jpg"):
        load_split("folder", tmp_path / "empty", "test")
    (tmp_path / "om" / "images_background" / "Latin").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no .png images under .*images_background; expected layout"):
        load_split("omniglot", tmp_path / "om", "train", strict=False)
    with pytest.raises(ValueError, match=r"'cub/train' has no images; check data_root"):
        ImageDataset(ImageSet([], None, "cub/train"), None)


# --------------------------------------------------------------------------- image files


def write_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good)
    full = folder / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    text = folder / "notes.jpg"
    text.write_text("this is not an image\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return good, [truncated, text, empty]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    good, bad = write_bad_files(tmp_path)
    handler = Records()
    logging.getLogger("udml").addHandler(handler)
    try:
        ds = ImageDataset(ImageSet([str(good), *map(str, bad)], np.arange(4), "mixed"), None)
    finally:
        logging.getLogger("udml").removeHandler(handler)
    assert ds.items == [str(good)] and ds.labels.tolist() == [0] and ds.kept.tolist() == [0]
    report = "\n".join(handler.messages)
    assert "skipped 3 unreadable image(s)" in report
    for path in bad:
        assert str(path) in report


def test_unreadable_images_without_cache(tmp_path):
    # Without the decode cache only headers are checked up front: a file that is not an image (or empty) is
    # skipped; a truncated file with an intact header fails when it is opened, naming the file and the fix.
    good, (truncated, text, empty) = write_bad_files(tmp_path)
    ds = ImageDataset(ImageSet([str(good), str(truncated), str(text), str(empty)], None, "x"), None, cache=False)
    assert ds.items == [str(good), str(truncated)]
    assert ds.image(0).mode == "RGB"
    with pytest.raises(OSError, match=r"cannot read image .*truncated.jpg.*Remove or replace the file"):
        ds.image(1)


def test_no_readable_image_is_a_clear_error(tmp_path):
    _, bad = write_bad_files(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"none of its 3 images could be read \(first: .*truncated.jpg.*\); "
        r"replace the damaged files",
    ):
        ImageDataset(ImageSet([str(p) for p in bad], None, "broken"), None)


def test_cmyk_grayscale_palette_and_alpha_images_load_as_rgb(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    cases = {}
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cases["cmyk.jpg"] = (rgb, 3)  # JPEG: a few levels of error
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    cases["gray.png"] = (np.repeat(rgb[..., :1], 3, axis=2), 0)
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "gray16.png")
    cases["gray16.png"] = (np.repeat(rgb[..., :1], 3, axis=2), 0)
    rgba = np.dstack([rgb, np.full((6, 6), 255, np.uint8)])
    rgba[:3, :, 3] = 0  # top half transparent: composited on white
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    expect = rgb.copy()
    expect[:3] = 255
    cases["alpha.png"] = (expect, 0)
    Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "gray_alpha.png")  # LA
    cases["gray_alpha.png"] = (np.repeat(expect[..., :1], 3, axis=2), 0)
    pal = Image.fromarray((np.arange(6)[:, None] >= 3).repeat(6, axis=1).astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 200, 100, 50])
    pal.save(tmp_path / "palette.png", transparency=0)  # index 0 (top half) transparent
    cases["palette.png"] = (expect, 0)

    for name, (want, tolerance) in cases.items():
        img = open_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (6, 6), name
        got = np.asarray(img).astype(int)
        assert np.abs(got - want).max() <= tolerance, (name, got[0, 0], got[-1, -1])
    ds = ImageDataset(ImageSet([str(tmp_path / n) for n in cases], None, "modes"), None)
    assert len(ds) == len(cases) and all(ds.image(i).mode == "RGB" for i in range(len(ds)))


# --------------------------------------------------------------------------- configuration


def test_unknown_configuration_key_lists_valid_keys():
    with pytest.raises(
        KeyError,
        match=r"unknown configuration key\(s\) num_cluster \(num_cluster -> did you mean num_clusters\?\); "
        r"valid keys are: .*num_clusters",
    ):
        make_config("digits", ["num_cluster=10"])


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"unknown backbone 'resnet5'; valid names are smallconv, googlenet, "
        r"resnet50.*timm:<model name>",
    ):
        create_backbone("resnet5")


def test_unknown_loss_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown loss 'triplets'; valid names are multi_similarity, .*triplet"):
        create_loss("triplets")
    # train() names a bad loss before it decodes any image (the data root does not even exist here)
    cfg = tiny_config(tmp_path, tmp_path / "not_there", loss="triplets")
    with pytest.raises(ValueError, match=r"unknown loss 'triplets'; valid names are"):
        train(cfg, tmp_path / "run")


def test_k_below_two_through_train(tmp_path):
    with pytest.raises(ValueError, match=r"num_clusters \(K\) must be at least 2, got 1; set num_clusters"):
        make_config("digits", ["num_clusters=1"])
    cfg = dataclasses.replace(tiny_config(tmp_path, tmp_path), num_clusters=1)  # skips make_config's checks
    with pytest.raises(ValueError, match=r"num_clusters \(K\) must be at least 2, got 1; set num_clusters"):
        train(cfg, tmp_path / "run")


def test_k_larger_than_the_number_of_images_through_train(tmp_path):
    data = make_folder(tmp_path / "data", n_classes=2, per_class=3)
    cfg = tiny_config(tmp_path, data, num_clusters=7)
    with pytest.raises(
        ValueError,
        match=r"num_clusters \(K=7\) is larger than the number of training images "
        r"\(6\); lower num_clusters",
    ):
        train(cfg, tmp_path / "run")


def test_fewer_non_empty_clusters_than_p():
    labels = np.array([5, 5, 9, 9, 9, 2])
    with pytest.raises(
        ValueError,
        match=r"only 3 non-empty clusters but clusters_per_batch \(P\) is 4; lower "
        r"clusters_per_batch or raise num_clusters",
    ):
        ClusterBatchSampler(labels, 4, 2, 10)
    sampler = ClusterBatchSampler(labels, 3, 2, 10)
    with pytest.raises(ValueError, match=r"only 1 non-empty clusters"):
        sampler.reset(np.zeros(6, int), seed=1)


@pytest.mark.filterwarnings("ignore:kmeans")
def test_fewer_non_empty_clusters_than_p_through_train(tmp_path):
    # Identical images: k-means can fill only one cluster, fewer than P = 2.
    data = make_folder(tmp_path / "data", n_classes=2, per_class=3, identical=True)
    cfg = tiny_config(tmp_path, data, num_clusters=3)
    with pytest.raises(
        ValueError,
        match=r"only 1 non-empty clusters but clusters_per_batch \(P\) is 2.*remove "
        r"duplicates",
    ):
        train(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_from_a_different_configuration(tmp_path):
    data = make_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, data)
    run = tmp_path / "run"
    run.mkdir()
    other = dataclasses.replace(cfg, lr=0.5, num_clusters=4)
    ckpt.atomic_save({"config": other.to_dict()}, run / "checkpoint.pt")
    with pytest.raises(
        ValueError,
        match=r"checkpoint .*checkpoint.pt was written with a different configuration "
        r"\(num_clusters: 4 in the checkpoint, 3 now; lr: 0.5 in the checkpoint, "
        r"0.001 now\). Resume with the run folder's own config.yaml",
    ):
        train(cfg, run, resume=True)
    # runtime settings may differ
    (run / "checkpoint.pt").unlink()
    ckpt.atomic_save(
        {"config": dataclasses.replace(cfg, num_workers=3, device="auto").to_dict()}, run / "checkpoint.pt"
    )
    saved = ckpt.load(run / "checkpoint.pt")["config"]
    check_same_configuration(cfg.to_dict(), saved, run / "checkpoint.pt", ignore=RUNTIME_FIELDS)


def test_damaged_or_missing_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip file")
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.pt cannot be read .*damaged or not a udml"):
        ckpt.load(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nothing.pt; .*start a new run"):
        ckpt.load(tmp_path / "nothing.pt")


def test_a_new_run_into_a_folder_that_holds_a_checkpoint_says_how_to_resume(tmp_path, capsys):
    from udml.cli import main

    (tmp_path / "run" / "checkpoint.pt").parent.mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(errors.PathProblem, match=r"already holds a checkpoint; continue it with --resume .*run"):
        new_run_dir(tmp_path, "run", "unused")
    argv = ["train", "--config", "digits", "--out", str(tmp_path), "run_name=run", "device=cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err and "bug in udml" not in err


def test_damaged_run_config_yaml(tmp_path):
    from udml.config import load_config

    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(ValueError, match=r"config.yaml: expected a mapping .*the file is damaged"):
        load_config(tmp_path / "config.yaml")
    with pytest.raises(FileNotFoundError, match=r"no configuration file at"):
        load_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- evaluation


def test_evaluation_k_larger_than_the_gallery():
    emb = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(
        ValueError,
        match=r"Recall@8 but the gallery has 5 items minus the query itself, so at "
        r"most 4 neighbours exist; use recall_ks values <= 4",
    ):
        evaluate(emb, labels, recall_ks=[1, 8], compute_nmi=False)
    with pytest.raises(ValueError, match=r"Recall@6 but the gallery has 5 items.*<= 5"):
        evaluate(emb, labels, recall_ks=[6], query=emb[:2], query_labels=labels[:2], compute_nmi=False)
    with pytest.raises(ValueError, match=r"k=6 neighbours requested but only 5 gallery items.*use k <= 5"):
        knn(emb, emb, 6)


def test_evaluation_k_larger_than_the_test_split_through_train(tmp_path):
    data = make_folder(tmp_path / "data", n_classes=2, per_class=3)
    cfg = tiny_config(tmp_path, data, recall_ks=[1, 8])
    with pytest.raises(
        ValueError,
        match=r"recall_ks asks for Recall@8 but the test split has 6 images, so each "
        r"query has 5 neighbours; use recall_ks values <= 5",
    ):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "lrr=1"], "did you mean lr?"),
        (["train", "--config", "cub_lite0", "rotaton_weight=0"], "did you mean rotation_weight?"),
        (["train", "--data", "/no/such/folder"], "/no/such/folder does not exist"),
        (["train", "--resume", "/no/such/run"], "the folder does not exist"),
        (["train", "--config", "no_such_preset"], "no configuration file or preset"),
    ],
)
def test_bad_train_arguments_are_reported_before_torch_is_imported(argv, message):
    """A mistyped key or a missing folder is answered at once: torch (tens of seconds to import on a busy
    machine) is not imported before the command line and the configuration are checked."""
    import subprocess
    import sys

    code = (
        "import sys; from udml.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_embedding_with_a_download_backbone_offline_is_one_line_without_a_traceback(tmp_path):
    """`udml embed pretrained:resnet50` on a machine that cannot reach the weights' server: one clear line, in a
    fresh process where udml.training was never imported. The network is made unreachable by a proxy on a closed
    local port and an empty torch hub cache."""
    import os
    import subprocess
    import sys

    make_folder(tmp_path / "photos", n_classes=1, per_class=2)
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    env.update(http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy="", NO_PROXY="")
    for backbone in ("resnet50", "googlenet"):
        proc = subprocess.run(
            [sys.executable, "-m", "udml", "embed", f"pretrained:{backbone}", str(tmp_path / "photos"), "-o", "x.npz"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("udml embed: error: could not download the ImageNet weights of backbone")
        assert "efficientnet_lite0" in proc.stderr  # the way out that works offline
        assert not (tmp_path / "x.npz").exists()


def test_every_udml_error_shares_one_base_the_command_line_knows():
    from udml import cli, errors

    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(kinds) >= 7 and all(issubclass(k, errors.UdmlError) for k in kinds)
    assert errors.UdmlError in cli.expected_errors()


def numpy_bug(args):
    import numpy as np

    np.zeros(3).reshape(2, 2)  # a ValueError raised inside a dependency: udml's bug, not the user's


@pytest.mark.parametrize(
    "error, expected",
    [
        (errors.InputError("bad value; give a good one"), True),
        (errors.MissingPath("no file at x.npz; make one with udml embed"), True),
        (OSError(28, "No space left on device"), True),  # a full disk, about a path the user gave
        (FileNotFoundError(2, "No such file or directory"), True),
        (ValueError("a bug deep inside"), False),  # not udml's own error: a bug
        (RuntimeError("a bug deep inside"), False),
        (KeyError("a bug deep inside"), False),
        (AttributeError("a bug deep inside"), False),
        (OSError(9, "Bad file descriptor: a bug deep inside"), False),
        ("numpy", False),
    ],
)
def test_command_line_turns_user_errors_into_one_line_and_keeps_the_traceback_of_anything_else(
    monkeypatch, capsys, error, expected
):
    from udml import cli

    def fail(args):
        raise error

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), numpy_bug if error == "numpy" else fail))
    monkeypatch.delenv("UDML_DEBUG", raising=False)
    if expected:
        assert cli.main(["index", "x.npz", "-o", "y"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("udml index: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
        monkeypatch.setenv("UDML_DEBUG", "1")  # the traceback of every error, on request
        assert cli.main(["index", "x.npz", "-o", "y"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.splitlines()[-1].startswith("udml index: error: ")
    else:
        assert cli.main(["index", "x.npz", "-o", "y"]) == 3
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert "this is a bug in udml, not in what you gave it: please report it" in err
        if error == "numpy":
            assert "cannot reshape array of size 3" in err and "numpy" in err


def _with_func(parser, func):
    parser._subparsers._group_actions[0].choices["index"].set_defaults(func=func)
    return parser


def test_a_checkpoint_from_before_a_new_option_resumes_with_the_options_default(tmp_path):
    """A checkpoint written before train_float32 / confident_fraction / train_crop_size existed lacks them: resuming
    it with their defaults (the earlier behaviour) is no configuration change; another value is."""
    data = make_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, data)
    old = {
        k: v for k, v in cfg.to_dict().items() if k not in ("train_float32", "confident_fraction", "train_crop_size")
    }
    run = tmp_path / "run"
    run.mkdir()
    ckpt.atomic_save({"config": old}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not a udml training checkpoint"):  # past the configuration check
        train(cfg, run, resume=True)
    with pytest.raises(ValueError, match=r"confident_fraction: 1.0 in the checkpoint, 0.5 now"):
        train(dataclasses.replace(cfg, confident_fraction=0.5), run, resume=True)
