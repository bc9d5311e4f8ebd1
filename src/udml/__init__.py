"""udml: unsupervised deep metric learning (UDML-SS) for image retrieval without labels."""

__version__ = "0.1.0"


def load(path, device: str = "cpu", amp: bool = True):
    """A trained model, ready to embed: ``udml.load("runs/x/model.pt").embed(["a.jpg", pil_image])``.

    ``path``: model.pt, checkpoint.pt or a run folder. Returns a :class:`udml.retrieval.Embedder`;
    its ``embed`` gives one L2-normalised float32 row per image, with the model's own test transform.
    ``amp``: the device's fast path (bfloat16 where the hardware has it, channels_last); False: float32.
    """
    from .retrieval import Embedder  # imported here so that ``import udml`` stays light

    return Embedder.from_file(path, device, amp=amp)
