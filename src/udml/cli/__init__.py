"""The ``udml`` command line: a module per command (train, evaluate, embed, index, cluster, search, serve, export),
each with its options beside the code that runs it (``add`` and ``run``); options that several commands share are
declared once (udml.cli.options). Errors: a user's prints one line; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import sys

from . import cluster, embed, evaluate, export, index, search, serve, train

COMMANDS = (train, evaluate, embed, index, cluster, search, serve, export)  # in the order of ``udml --help``


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udml", description="Unsupervised deep metric learning: UDML-SS and STML (docs/method.md)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix, printed as one line: udml's own errors (udml.errors.UdmlError); an OSError
    qualifies only when it is about a path (udml.errors.is_user_error). Anything else, a bug or CUDA running out
    of memory, keeps its traceback."""
    from ..errors import UdmlError

    return (UdmlError,)


BUG_REPORT = (
    "this is a bug in udml, not in what you gave it: please report it to udml's issue tracker with the command "
    "line, the traceback above and the versions of udml, torch and Python (pip show udml torch)"
)
DEBUG_ENV = "UDML_DEBUG"  # UDML_DEBUG=1: the traceback of every error, the user's too


def main(argv: list[str] | None = None) -> int:
    import os
    import traceback

    from ..errors import is_user_error

    parser = build_parser()
    # argparse takes a subcommand's positionals in one run, so `udml train --out DIR lr=1e-4` would leave lr=1e-4
    # unrecognised: key=value words found after an option are the train command's overrides too.
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "command", None) == "train" and all(train._is_override(w) for w in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - sorted below: the user's become one line, the rest keep their traceback
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        if is_user_error(e):
            if debug:
                traceback.print_exc()
            print(f"udml {args.command}: error: {e}", file=sys.stderr)
            return 2
        if type(e).__name__ == "OutOfMemoryError":
            print(
                f"udml {args.command}: out of memory on the GPU: lower clusters_per_batch or "
                "eval_batch_size, set grad_checkpointing=true, or use a smaller image_size",
                file=sys.stderr,
            )
            raise
        traceback.print_exc()
        print(f"udml {args.command}: {type(e).__name__}: {e}\n{BUG_REPORT}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
