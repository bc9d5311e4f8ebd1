"""The benchmarks of udml: each module runs as ``python -m benchmarks.NAME`` from the repository root (README.md)."""
