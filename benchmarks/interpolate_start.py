"""Weight interpolation with the pretrained start (WiSE-FT, Wortsman et al., CVPR 2022), after training.

    python -m benchmarks.interpolate_start runs/cub_val_seed0 --alphas 0 0.25 0.5 0.75 1

For each a: the run's final weights w become w0 + a (w - w0), w0 the network the run started from (its
configuration's pretrained backbone and freshly made heads), and ``udml evaluate`` scores that model on the run's
test split. a = 1 is the trained model, a = 0 the start. Prints and writes the metrics per a
(``<run>/interpolate_start.json``). Used on issue #19's CUB `val` rows (RESULTS.md); nothing is chosen on test data.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from udml.checkpoint import read_model, save_model
from udml.config import load_config
from udml.models import model_from_config

from .harness import base_parser, run_timed, write_results


def main(argv: list[str] | None = None) -> int:
    ap = base_parser(__doc__)
    ap.add_argument("run", type=Path, help="a finished run folder (config.yaml, model.pt)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = ap.parse_args(argv)
    cfg = load_config(args.run / "config.yaml")
    start = model_from_config(cfg).state_dict()
    _, trained = read_model(args.run / "model.pt")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for a in args.alphas:
            model = model_from_config(cfg)
            mixed = {k: s + a * (trained[k] - s) if s.is_floating_point() else trained[k] for k, s in start.items()}
            model.load_state_dict(mixed)
            results[str(a)] = evaluated(model, cfg, Path(tmp) / f"a{a}.pt", Path(tmp) / f"a{a}.json")
            print(a, {k: round(100 * v, 2) for k, v in results[str(a)].items() if isinstance(v, float)}, flush=True)
    write_results(args.run / "interpolate_start.json", results)
    return 0


def evaluated(model, cfg, path: Path, out: Path) -> dict:
    """``udml evaluate`` of the model (saved at ``path``) on the run's test split (its metrics at ``out``)."""
    save_model(model, cfg, path)
    root = cfg.test_root or cfg.data_root
    data = ["--data", root] if root else []  # none: a pack shipped with udml
    run_timed("evaluate", path, "--dataset", cfg.dataset, *data, "--split", cfg.test_split, "-o", out)
    return json.loads(out.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
