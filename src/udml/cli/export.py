"""``udml export``: a model as ONNX, checked against PyTorch."""

from __future__ import annotations


def run(args) -> int:
    from ..export import export_onnx
    from ..inference import load_model

    model = load_model(args.model, "cpu")
    diff = export_onnx(model, args.output, input_kind=args.input, opset=args.opset)
    check = "" if diff is None else f"; onnxruntime matches PyTorch to {diff:.1e}"
    print(
        f"{args.output}: input 'images' {args.input} [B, 3, {model.image_size}, {model.image_size}] "
        f"(RGB 0-255, shorter side resized to {model.resize_size} then centre-cropped), output 'embeddings' "
        f"[B, {model.embedding_dim}]{check}"
    )
    return 0


def add(sub) -> None:
    x = sub.add_parser("export", help="export a model to ONNX (images in, L2-normalised embeddings out)")
    x.add_argument("model", help="model.pt, checkpoint.pt or a run folder")
    x.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    x.add_argument(
        "--input",
        choices=["uint8", "float"],
        default="uint8",
        help="input type: uint8 or float32 RGB pixels in 0-255, NCHW (default uint8)",
    )
    x.add_argument("--opset", type=int, default=17)
    x.set_defaults(func=run)
