"""The options that several commands share, declared once."""

from __future__ import annotations

FLOAT32_HELP = (
    "run the network in float32 (NCHW): bit-stable embeddings. By default it runs in bfloat16 with channels_last "
    "where the device computes bfloat16 natively (recent GPUs; CPUs with AVX512-BF16 or AMX), float32 elsewhere"
)


def device(p, help: str = "auto (default), cpu, cuda or cuda:N") -> None:
    p.add_argument("--device", help=help)


def float32(p) -> None:
    p.add_argument("--float32", action="store_true", help=FLOAT32_HELP)
