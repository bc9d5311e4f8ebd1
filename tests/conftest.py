import logging
import os
import shutil
from pathlib import Path

import pytest


def shared_data(*parts: str) -> Path:
    """The one rule by which tests find the shared data: ../shared/data beside the repository, or
    $UDML_SHARED_DATA; with ``parts``, a path inside it, and the test is skipped when that is absent."""
    base = Path(os.environ.get("UDML_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = base.joinpath(*parts)
    if parts and not path.exists():
        pytest.skip(f"shared data {path} not available (../shared/data beside the repository, or $UDML_SHARED_DATA)")
    return path


# Three CUB species that the retrieval, serving and collection tests use.
CUB_CLASSES = ("001.Black_footed_Albatross", "017.Cardinal", "036.Northern_Flicker")
BIRDS_PER_CLASS = 12  # the birds fixture: 36 photos


def cub_photos(root: Path, classes, per_class: int | None = None, copy: bool = False) -> Path:
    """CUB photos in one real sub-folder per class under ``root`` (made): ``classes`` are folder names or indices
    in CUB's sorted class list; the first ``per_class`` photos of each (all: None). The files are symlinks, never
    linked folders, so that a test writing beside the photos cannot write into the shared data; ``copy``: copies,
    for a test that changes or removes them."""
    images = shared_data("CUB_200_2011", "images")
    names = sorted(p.name for p in images.iterdir()) if any(isinstance(c, int) for c in classes) else None
    for c in classes:
        name = names[c] if isinstance(c, int) else c
        (root / name).mkdir(parents=True)
        for f in sorted((images / name).iterdir())[:per_class]:
            if copy:
                shutil.copy2(f, root / name / f.name)
            else:
                (root / name / f.name).symlink_to(f)
    return root


def spare_photos(n: int) -> list[Path]:
    """Photos not in a collection of ``cub_photos(root, CUB_CLASSES, 4)``: the next ones of the first species."""
    return sorted((shared_data("CUB_200_2011", "images") / CUB_CLASSES[0]).iterdir())[4 : 4 + n]


def change_collection(root: Path) -> dict:
    """Add 2 photos, change 1 (other content under its name), remove 1, rename 1, add an unreadable file."""
    first, second = sorted((root / CUB_CLASSES[0]).iterdir()), sorted((root / CUB_CLASSES[1]).iterdir())
    for f in spare_photos(2):
        shutil.copy2(f, root / CUB_CLASSES[0] / f.name)
    changed = second[0]
    changed.write_bytes(second[1].read_bytes())  # another photo's content: size and mtime change
    first[0].unlink()
    renamed = root / CUB_CLASSES[2] / "renamed.jpg"
    os.rename(sorted((root / CUB_CLASSES[2]).iterdir())[0], renamed)
    (root / "broken.jpg").write_bytes(b"not an image")
    return {"changed": str(changed), "removed": str(first[0]), "renamed": str(renamed)}


@pytest.fixture
def cub_root() -> Path:
    return shared_data("CUB_200_2011")


@pytest.fixture
def omniglot_root() -> Path:
    return shared_data("omniglot")


@pytest.fixture(scope="module")
def cub3(tmp_path_factory) -> Path:
    """Three CUB classes (CUB_CLASSES), every photo of each, linked file by file into a folder per class."""
    return cub_photos(tmp_path_factory.mktemp("cub3"), CUB_CLASSES)


@pytest.fixture(scope="module")
def photos(cub3) -> Path:
    """The folder ``embedded`` embeds: cub3, unless a test module defines its own ``photos``."""
    return cub3


@pytest.fixture
def changing_photos(tmp_path) -> Path:
    """12 real photos (4 of each of 3 species) copied into a folder that the test may change."""
    return cub_photos(tmp_path / "photos", CUB_CLASSES, 4, copy=True)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained small convnet at 32 px, as a model file: enough to test the plumbing exactly."""
    import torch

    from udml.checkpoint import save_model
    from udml.config import make_config
    from udml.models import model_from_config

    cfg = make_config("digits", ["embedding_dim=32"])
    torch.manual_seed(0)
    model = model_from_config(cfg)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, cfg, path)
    return path


@pytest.fixture(scope="module")
def embedded(photos, model_file):
    """The module's ``photos`` folder embedded by ``model_file`` (udml.retrieval.embed_folder)."""
    from udml.retrieval import Embedder, embed_folder

    return embed_folder(Embedder.from_file(model_file), photos)


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> Path:
    """36 CUB photos (12 of each of CUB_CLASSES) linked in one folder per species: what udml serve's tests serve
    (their modules make it their ``photos``)."""
    return cub_photos(tmp_path_factory.mktemp("birds"), CUB_CLASSES, BIRDS_PER_CLASS)


@pytest.fixture(scope="module")
def index_file(tmp_path_factory, embedded) -> Path:
    """The module's ``embedded`` photos as a flat faiss index file."""
    from udml.index import build_index, save_index

    path = tmp_path_factory.mktemp("index") / "birds.faiss"
    save_index(path, build_index(embedded.embeddings), embedded, "flat")
    return path


@pytest.fixture(scope="module")
def collection(index_file):
    """``index_file`` opened as udml serve opens it (udml.serve.Collection)."""
    from udml.serve import open_collection

    return open_collection(index_file, device="cpu")


@pytest.fixture
def udml_log(caplog):
    """caplog at INFO for the "udml" logger (which propagates: the library configures no console of its own)."""
    caplog.set_level(logging.INFO, logger="udml")
    return caplog
