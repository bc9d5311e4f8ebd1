"""The documentation against the code: every `udml ...` command line in README.md and docs/ parses with the real
parser (no removed command, flag or configuration key stays documented), and every configuration key is listed in
docs/configuration.md."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from udml.cli import build_parser
from udml.cli.train import _is_override
from udml.config import FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def command_lines(text: str) -> list[tuple[str, str]]:
    """The udml command lines of a Markdown text, as (kind, line): "block" for the lines of fenced code blocks that
    run udml (directly, through torchrun or python -m; a line ending in a backslash continues), "inline" for code
    spans in the text that start with `udml ` (often a command named with some of its options only)."""
    found = []
    in_block, pending = False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        code = (pending + " " + line.split(" #", 1)[0].strip()).strip()
        if code.endswith("\\"):
            pending = code[:-1]
            continue
        pending = ""
        if re.match(r"^(udml |torchrun .*-m udml |python3? -m udml )", code):
            found.append(("block", code))
    found += [("inline", " ".join(m.split())) for m in re.findall(r"`(udml [^`]+)`", text)]
    return found


def argv_of(line: str) -> list[str]:
    words = shlex.split(line.replace("\\\n", " "))
    if words[0] == "udml":
        words = words[1:]
    else:  # torchrun [options] -m udml ..., python -m udml ...
        words = words[words.index("udml") + 1 :]
    return [w for w in words if w not in ("...", "…") and not w.startswith(("$", "<"))]


def documented() -> list[tuple[str, str, str]]:
    return [
        (p.relative_to(ROOT).as_posix(), kind, line)
        for p in DOCS
        if p.exists()
        for kind, line in command_lines(p.read_text())
    ]


def test_the_docs_hold_command_lines():
    lines = documented()
    assert len(lines) > 30 and any(where == "README.md" and kind == "block" for where, kind, _ in lines)


@pytest.mark.parametrize("where, kind, line", documented())
def test_every_documented_command_line_parses(where, kind, line):
    argv = argv_of(line)
    parser = build_parser()
    if kind == "inline" or "..." in line.split():  # named in the text, or arguments elided: check names
        commands = parser._subparsers._group_actions[0].choices
        assert argv[0] in commands, f"{where}: `{line}`: udml has no command {argv[0]!r}"
        options = commands[argv[0]]._option_string_actions
        unknown = [w.split("=")[0] for w in argv[1:] if w.startswith("-") and w.split("=")[0] not in options]
        assert not unknown, f"{where}: `{line}`: udml {argv[0]} has no option {', '.join(unknown)}"
        for word in argv[1:]:
            if argv[0] == "train" and _is_override(word) and not word.endswith("="):
                assert word.split("=")[0].replace("-", "_") in FIELDS, (
                    f"{where}: `{line}`: {word} is not a configuration key"
                )
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, rest = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{line}` does not parse: {err.getvalue().strip().splitlines()[-1]}")
    if args.command == "train":
        overrides = list(args.overrides) + rest
        rest = [w for w in rest if not _is_override(w)]
        for word in overrides:
            key = word.split("=", 1)[0].strip().replace("-", "_")
            assert key in FIELDS, f"{where}: `{line}` sets {key!r}, which is not a configuration key"
    assert not rest, f"{where}: `{line}`: {' '.join(rest)} not understood by udml {args.command}"


def test_every_configuration_key_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    assert set(FIELDS) - listed == set(), "configuration keys missing from docs/configuration.md"
    assert listed - set(FIELDS) == set(), "docs/configuration.md lists keys udml does not have"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_between_the_docs_leads_somewhere(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{path.name}: link to {target}: no such heading"


def test_every_test_the_docs_cite_exists():
    """A `tests/test_x.py` (or `test_x.py::name`) named in README, docs or RESULTS.md is there, with that test."""
    pages = [p for p in DOCS if p.exists()] + [ROOT / "benchmarks" / "RESULTS.md"]
    for page in pages:
        for file, name, star in re.findall(r"(test_\w+\.py)(?:::(\w+)(\*?))?", page.read_text()):
            path = ROOT / "tests" / file
            assert path.exists(), f"{page.name} cites tests/{file}, which does not exist"
            cited = f"def {name}" if star else f"def {name}("  # test_x_*: some test whose name starts so
            assert not name or cited in path.read_text(), f"{page.name} cites {file}::{name}{star}: no such test"
