"""The decoded-image store on disk (cache_images=disk, udml.store), on a few dozen real CUB images."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from udml import images, store
from udml.cli import main as cli
from udml.config import check_paths, make_config
from udml.data import ImageDataset, make_loader
from udml.data import test_transform as centre_crop
from udml.data import train_transform as random_crop
from udml.datasets import ImageSet, load_cub
from udml.rundir import METRICS
from udml.session import prepare
from udml.training import train

SHORT = 64  # short side of the stored images: small, so that the tests stay quick


@pytest.fixture
def cub_files(cub_root, tmp_path):
    """Copies of 24 CUB images from 8 classes (copies: the tests change some), an empty file and a text file
    with an image's name."""
    cub = load_cub(cub_root, "train")
    picks = [i for c in range(8) for i in np.flatnonzero(cub.labels == c)[:3]]
    folder = tmp_path / "images"
    folder.mkdir()
    paths, labels = [], []
    for i in picks:
        paths.append(folder / f"{len(paths):02d}_{Path(cub.images[i]).name}")
        shutil.copyfile(cub.images[i], paths[-1])
        labels.append(int(cub.labels[i]))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    paths[5:5] = [folder / "empty.jpg"]
    paths.append(folder / "text.jpg")
    labels[5:5] = [0]
    labels.append(1)
    return ImageSet([str(p) for p in paths], np.array(labels), "cub/train")


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded (the store decodes through images.decode_one)."""
    calls = []
    real = images.decode_one

    def counted(item, short_side=None):
        calls.append(item)
        return real(item, short_side)

    monkeypatch.setattr(images, "decode_one", counted)
    return calls


def stores(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def test_the_store_holds_the_pixels_of_the_memory_cache(cub_files, tmp_path, udml_log):
    memory = ImageDataset(cub_files, None, cache=True, short_side=SHORT)
    disk = ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=tmp_path / "stores")
    assert disk.arrays is None and disk.store is not None and len(disk) == len(memory) == 24
    assert disk.items == memory.items and disk.kept.tolist() == memory.kept.tolist()
    assert disk.labels.tolist() == memory.labels.tolist()
    for i in range(len(memory)):
        assert np.array_equal(np.asarray(disk.image(i)), memory.arrays[i]), i
    assert min(memory.arrays[0].shape[:2]) == SHORT  # shrunk, as in memory
    # the same seeded random crops and the same centre crops
    aug = random_crop(48, resize_size=SHORT)
    for i in (0, 7, 23):
        assert torch.equal(disk.with_transform(aug)[(i, 11 + i)][0], memory.with_transform(aug)[(i, 11 + i)][0])
    plain = centre_crop(48, resize_size=SHORT)
    assert torch.equal(disk.with_transform(plain)[3][0], memory.with_transform(plain)[3][0])
    # one folder with the three files, named by the data set and the short side
    (folder,) = stores(tmp_path / "stores")
    assert folder.name.startswith("cub_train-") and f"-{SHORT}px-" in folder.name
    assert {p.name for p in folder.iterdir()} == {"pixels.u8", "index.npy", "manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["bytes"] == sum(a.nbytes for a in memory.arrays) == os.path.getsize(folder / "pixels.u8")
    assert len(manifest["files"]) == 26 and manifest["short_side"] == SHORT


def test_a_store_is_reused_without_decoding(cub_files, tmp_path, decodes, udml_log):
    root = tmp_path / "stores"
    first = ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    assert len(decodes) == 26
    (folder,) = stores(root)
    written = os.stat(folder / "pixels.u8")
    decodes.clear()
    udml_log.clear()
    again = ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    assert decodes == [] and "reused" in udml_log.text
    assert stores(root) == [folder] and os.stat(folder / "pixels.u8").st_mtime_ns == written.st_mtime_ns
    assert all(np.array_equal(np.asarray(again.image(i)), np.asarray(first.image(i))) for i in range(len(first)))
    # another short side is another store, beside the first
    ImageDataset(cub_files, None, cache="disk", short_side=SHORT + 8, store_dir=root)
    assert len(stores(root)) == 2 and folder in stores(root)


def test_a_changed_added_or_removed_file_gives_a_new_store(cub_files, tmp_path, decodes):
    root = tmp_path / "stores"
    ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    (old,) = stores(root)
    paths = cub_files.images

    def rebuilt(image_set):
        decodes.clear()
        ds = ImageDataset(image_set, None, cache="disk", short_side=SHORT, store_dir=root)
        (folder,) = stores(root)  # the superseded store is removed
        assert len(decodes) == len(image_set)
        return ds, folder

    # same size, new content and modification time: the new pixels, not the old ones
    shutil.copyfile(paths[1], paths[0])
    ds, changed = rebuilt(cub_files)
    assert changed != old and np.array_equal(np.asarray(ds.image(0)), np.asarray(ds.image(1)))
    # only touched
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, touched = rebuilt(cub_files)
    assert touched not in (old, changed)
    # a file added, then one removed
    extra = Path(paths[0]).with_name("extra.jpg")
    shutil.copyfile(paths[3], extra)
    bigger = ImageSet(paths + [str(extra)], np.append(cub_files.labels, 0), cub_files.name)
    ds, added = rebuilt(bigger)
    assert added != touched and len(ds) == 25
    _, removed = rebuilt(ImageSet(paths[1:], cub_files.labels[1:], cub_files.name))
    assert removed != added


def test_unreadable_files_are_skipped_and_reported_on_every_run(cub_files, tmp_path, udml_log):
    for _ in range(2):  # built, then reused: reported both times
        udml_log.clear()
        ds = ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=tmp_path / "stores")
        warnings = [r.getMessage() for r in udml_log.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "skipped 2 unreadable image(s)" in warnings[0]
        assert "empty.jpg" in warnings[0] and "text.jpg" in warnings[0]
        assert len(ds) == 24 and not any(p.endswith(("empty.jpg", "text.jpg")) for p in ds.items)
        bad = ("empty.jpg", "text.jpg")
        assert ds.labels.tolist() == [y for p, y in zip(cub_files.images, cub_files.labels) if Path(p).name not in bad]


def test_an_aborted_build_leaves_nothing_that_is_reused(cub_files, tmp_path, monkeypatch, decodes):
    root = tmp_path / "stores"
    real = images.decode_one

    def failing(item, short_side=None):
        if len(decodes) > 10:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return real(item, short_side)

    monkeypatch.setattr(images, "decode_one", failing)
    with pytest.raises(KeyboardInterrupt):
        ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    assert [p for p in root.iterdir() if not p.name.endswith(".lock")] == []  # the temporary folder is gone
    monkeypatch.setattr(images, "decode_one", real)
    ds = ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    assert len(ds) == 24


KILLED_BUILD = """
import sys, time
from udml import images, store
real = images.decode_one
def slow(item, short_side=None):
    time.sleep(0.2)
    return real(item, short_side)
images.decode_one = slow
store.open_or_build(sys.argv[3:], int(sys.argv[2]), sys.argv[1], "cub/train", workers=1)
"""


def test_a_killed_build_leaves_nothing_that_is_reused(cub_files, tmp_path, decodes):
    """A build killed with SIGKILL (no clean-up code runs) leaves its temporary folder; the next build, holding
    the lock, removes it and builds a whole store."""
    root = tmp_path / "stores"
    root.mkdir()
    script = tmp_path / "killed_build.py"
    script.write_text(KILLED_BUILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(SHORT), *cub_files.images], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            temporaries = list(root.glob(".build-*/pixels.u8"))
            if temporaries and temporaries[0].stat().st_size > 0:
                break
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no temporary build folder appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert stores(root) == [] and list(root.glob(".build-*"))  # nothing that looks like a store
    ds = ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    assert len(decodes) == 26 and len(ds) == 24
    assert list(root.glob(".build-*")) == [] and len(stores(root)) == 1


def test_a_damaged_store_is_rebuilt(cub_files, tmp_path, decodes, udml_log):
    root = tmp_path / "stores"
    ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    (folder,) = stores(root)
    with open(folder / "pixels.u8", "r+b") as f:
        f.truncate(1000)
    decodes.clear()
    ds = ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    assert len(decodes) == 26 and "does not match" in udml_log.text
    assert stores(root) == [folder] and len(ds) == 24 and ds.image(23).size[0] > 0


def test_builds_started_together_build_once(cub_files, tmp_path, decodes):
    """Processes that start at once (torchrun's) take the lock in turn: one builds, the others open its store."""
    root = tmp_path / "stores"
    out = []
    threads = [
        threading.Thread(target=lambda: out.append(store.open_or_build(cub_files.images, SHORT, root, "cub/train")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and len({s.path for s in out}) == 1 and len(decodes) == 26


def test_without_file_locks_concurrent_builds_are_still_safe(cub_files, tmp_path, decodes, monkeypatch):
    """Where flock does not work, both build and the first rename wins; the other process uses that store."""
    monkeypatch.setattr(store, "fcntl", None)
    root = tmp_path / "stores"
    barrier = threading.Barrier(2)
    real = images.decode_one

    def together(item, short_side=None):  # both builds decode their first image before either finishes
        if item == cub_files.images[0]:
            barrier.wait(timeout=30)
        return real(item, short_side)

    monkeypatch.setattr(images, "decode_one", together)
    out = []
    threads = [
        threading.Thread(target=lambda: out.append(store.open_or_build(cub_files.images, SHORT, root, "cub/train")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0].path == out[1].path and stores(root) == [out[0].path]
    assert list(root.glob(".build-*")) == []
    assert all(np.array_equal(out[0].array(i), out[1].array(i)) for i in range(len(out[0])) if out[0].index[i, 1])


def test_the_store_through_a_dataloader_with_two_workers(cub_files, tmp_path):
    memory = ImageDataset(cub_files, centre_crop(48, resize_size=SHORT), cache=True, short_side=SHORT)
    disk = ImageDataset(cub_files, memory.transform, cache="disk", short_side=SHORT, store_dir=tmp_path / "stores")
    # a worker gets the store as its path and index, never its pixels
    blob = pickle.dumps(disk)
    assert len(blob) < disk.store.nbytes / 10
    copy = pickle.loads(blob)
    assert copy.store._fd is None and torch.equal(copy[4][0], memory[4][0])
    got = torch.cat([x for x, _ in make_loader(disk, batch_size=5, num_workers=2)])
    assert torch.equal(got, torch.stack([memory[i][0] for i in range(len(memory))]))


def folder_of_links(cub_root, split: str, per_class: int, classes: int, where: Path, by_class: bool) -> Path:
    cub = load_cub(cub_root, split)
    where.mkdir()
    for c in range(classes):
        target = where / f"c{c:02d}" if by_class else where
        target.mkdir(exist_ok=True)
        for i in np.flatnonzero(cub.labels == c)[:per_class]:
            os.symlink(cub.images[i], target / Path(cub.images[i]).name)
    return where


TINY = [
    "dataset=folder",
    "backbone=smallconv",
    "pretrained=false",
    "image_size=32",
    "resize_size=40",
    "embedding_dim=32",
    "num_clusters=6",
    "clusters_per_batch=3",
    "images_per_cluster=4",
    "rotation_images=3",
    "pseudo_epochs=2",
    "recluster_every=1",
    "epoch_images_per_cluster=4",
    "kmeans_iters=5",
    "lr=1e-3",
    "pictures=false",
    "recall_ks=[1,2]",
    "device=cpu",
]


def test_udml_train_with_the_store_gives_the_numbers_of_the_memory_cache(cub_root, tmp_path, decodes):
    """Same pixels and same seeds: the same run, whether the images are cached in memory or read from the store
    (by 2 loader workers), and a resumed run reuses the store."""
    train_dir = folder_of_links(cub_root, "train", 6, 8, tmp_path / "train", by_class=False)
    test_dir = folder_of_links(cub_root, "test", 4, 6, tmp_path / "test", by_class=True)
    common = TINY + [f"data_root={train_dir}", f"test_root={test_dir}", f"out_dir={tmp_path}"]
    memory = train(make_config(None, common + ["run_name=memory", "num_workers=0"]))
    root = tmp_path / "stores"
    cfg = make_config(None, common + ["run_name=disk", "cache_images=disk", f"store_dir={root}", "num_workers=2"])
    decodes.clear()
    disk = train(cfg)
    assert len(decodes) == 48 + 24 and len(stores(root)) == 2  # the training split and the test split
    lines = {
        name: [
            {k: v for k, v in json.loads(r).items() if k not in ("seconds", "elapsed_s")}
            for r in (tmp_path / name / METRICS).open()
        ]
        for name in ("memory", "disk")
    }
    assert lines["disk"] == lines["memory"] and len(lines["disk"]) >= 6
    assert disk["final"] == memory["final"] and disk["start"] == memory["start"]
    # resumed (here: after its last round), with the run folder's configuration: no image decoded again
    decodes.clear()
    assert cli(["train", "--resume", str(tmp_path / "disk")]) == 0
    assert decodes == [] and len(stores(root)) == 2


def test_a_session_with_the_store_holds_no_decoded_images(cub_root, tmp_path):
    train_dir = folder_of_links(cub_root, "train", 3, 8, tmp_path / "train", by_class=False)
    test_dir = folder_of_links(cub_root, "test", 2, 4, tmp_path / "test", by_class=True)
    cfg = make_config(
        None,
        TINY
        + [
            f"data_root={train_dir}",
            f"test_root={test_dir}",
            "cache_images=disk",
            f"store_dir={tmp_path / 'stores'}",
            "num_workers=0",
        ],
    )
    s = prepare(cfg, torch.device("cpu"))
    for ds in (s.aug, s.train_plain, s.test_plain):
        assert isinstance(ds, ImageDataset) and ds.store is not None
        assert ds.arrays is None and ds.stacked is None
    assert s.aug.store is s.train_plain.store  # the two views of the training images share one store


def test_a_folder_of_in_memory_images_falls_back_to_the_memory_cache(tmp_path, udml_log):
    cfg = make_config("digits", ["cache_images=disk", f"store_dir={tmp_path / 'stores'}", "num_workers=0"])
    s = prepare(cfg, torch.device("cpu"))
    assert s.aug.store is None and s.aug.arrays is not None and "cached in memory" in udml_log.text
    assert not (tmp_path / "stores").exists() or stores(tmp_path / "stores") == []


def test_an_unwritable_store_dir_is_reported_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = make_config(None, ["cache_images=disk", f"store_dir={blocker / 'stores'}"])
    with pytest.raises(OSError, match="store_dir: cannot create the image store directory"):
        check_paths(cfg)
    code = cli(["train", "--config", "digits", "cache_images=disk", f"store_dir={blocker}", f"--out={tmp_path}"])
    assert code == 2 and "store_dir" in capsys.readouterr().err
    check_paths(make_config(None, [f"store_dir={blocker}"]))  # not used without cache_images=disk


def test_the_default_store_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert store.default_store_dir() == tmp_path / "udml" / "stores"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert store.default_store_dir() == Path.home() / ".cache" / "udml" / "stores"


def test_a_full_disk_while_building_is_a_clear_error_and_leaves_nothing(cub_files, tmp_path, monkeypatch):
    import errno

    root = tmp_path / "stores"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device.*needs about 0\.0 GB.*store_dir") as e:
        ImageDataset(cub_files, None, cache="disk", short_side=SHORT, store_dir=root)
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_torchrun_with_the_store(cub_root, tmp_path):
    """Two processes (gloo) start together: the stores are built once under the lock, both processes read them,
    and the run ends with its final evaluation."""
    train_dir = folder_of_links(cub_root, "train", 6, 8, tmp_path / "train", by_class=False)
    test_dir = folder_of_links(cub_root, "test", 4, 6, tmp_path / "test", by_class=True)
    root = tmp_path / "stores"
    options = [o for o in TINY if not o.startswith(("clusters_per_batch", "rotation_images"))]
    options += ["clusters_per_batch=2", "rotation_images=2", "num_workers=0", "cache_images=disk"]
    options += [f"store_dir={root}", f"data_root={train_dir}", f"test_root={test_dir}", "run_name=ddp"]
    options += ["--out", str(tmp_path)]  # after every key=value: argparse takes the positionals in one run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        cmd + ["-m", "udml", "train", *options],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout  # which process builds a store is whichever takes its lock first
    assert len(stores(root)) == 2 and list(root.glob(".build-*")) == []
    records = [json.loads(r) for r in (tmp_path / "ddp" / METRICS).open()]
    assert any(r.get("final") for r in records)
