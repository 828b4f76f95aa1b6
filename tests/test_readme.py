"""README is a short guide whose every figure is read from a results file.

A block of lines carrying figures (a table or a paragraph) has a marker right above it:

    <!-- figures: docs/results/held_out.json -->
    | method | ... 38.30 (+1.14) ... |

and ends at the next blank line. Every number in the block (decimals, integers, each side of 256x256x80)
must be a value of the named JSON file(s), rounded as printed: 2.1 matches 2.09, +0.90 matches 0.9.
Outside marked blocks README may carry no decimal and no integer with a measuring unit (dB, s, min, GiB,
...), except in the few phrases of WHITELIST. Code (fenced blocks, `inline`) and link targets are not
figures and are skipped. Marked blocks in docs/ and the model card are checked the same way.
"""
from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300
# Phrases whose decimals are allowed in README outside marked blocks: version numbers only.
WHITELIST = ("Python 3.10", "CC BY 3.0")
CHECKED = [README, ROOT / "pretrained" / "MODEL_CARD.md", ROOT / "pretrained" / "README.md",
           ROOT / "evaluation" / "README.md", ROOT / "train" / "README.md", ROOT / "benchmarks" / "README.md",
           *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"^\s*<!--\s*figures:\s*(.+?)\s*-->\s*$")  # a line of its own
FENCE = re.compile(r"^\s*(```|~~~)")
# a number not glued to a word, a path or a hyphenated name (LIDC-IDRI-0314); 256x256x80 is one token
NUMBER = re.compile(r"(?<![\w/\-])(?<!\w\.)[+\-]?\d+(?:\.\d+)*(?:x\d+(?:\.\d+)?)*")
UNIT = re.compile(r"(?<![\w/\-.])\d+\s*(?:dB|s|ms|min|minutes?|seconds?|h|hours?|GiB|GB|MiB|MB|KB|%)(?![\w])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def prose(line: str) -> str:
    """The line without inline code, link targets and HTML comments: what a reader reads as text."""
    line = re.sub(r"<!--.*?-->", " ", line)
    line = re.sub(r"`[^`]*`", " ", line)
    return re.sub(r"\]\([^)]*\)", "] ", line)


def blocks(text: str):
    """(files, [(line number, prose)]) per marked block, and the unmarked prose lines, code skipped."""
    marked, unmarked, files, in_code = [], [], None, False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        m = MARKER.search(line)
        if m:
            files = m.group(1).split()
            marked.append((files, []))
            continue
        if not line.strip():
            files = None
        elif files is not None:
            marked[-1][1].append((no, prose(line)))
        else:
            unmarked.append((no, prose(line)))
    return marked, unmarked


def numbers(tree) -> list[Decimal]:
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return []
    if isinstance(tree, (int, float)):
        return [Decimal(repr(tree))]
    items = tree.values() if isinstance(tree, dict) else tree
    return [n for item in items for n in numbers(item)]


def printed_as(value: Decimal, printed: str) -> bool:
    shown = Decimal(printed)
    return value.quantize(Decimal(1).scaleb(shown.as_tuple().exponent), rounding=ROUND_HALF_UP) == shown


def missing_figures(text: str) -> list[str]:
    """Every number of a marked block that is no value of its files (or a marker whose file is missing)."""
    problems = []
    marked, _ = blocks(text)
    for files, lines in marked:
        values = []
        for name in files:
            path = ROOT / name
            if not path.is_file():
                problems.append(f"marker names {name}, which does not exist")
                continue
            values += numbers(json.loads(path.read_text()))
        if not lines:
            problems.append(f"marker for {files} has no block under it")
        for no, line in lines:
            for token in NUMBER.findall(line):
                for part in token.split("x"):
                    if part.count(".") > 1:  # a version number
                        problems.append(f"line {no}: {part} in a figures block")
                    elif not any(printed_as(v, part) for v in values):
                        problems.append(f"line {no}: {part} is not in {' '.join(files)}")
    return problems


def unsourced_figures(text: str) -> list[str]:
    _, unmarked = blocks(text)
    problems = []
    for no, line in unmarked:
        for phrase in WHITELIST:
            line = line.replace(phrase, " ")
        found = [t for t in NUMBER.findall(line) if "." in t] + UNIT.findall(line)
        problems += [f"line {no}: {t} outside a marked block" for t in found]
    return problems


def test_readme_is_a_guide_of_at_most_300_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README has {len(lines)} lines; move detail to docs/"
    text = README.read_text()
    assert "make demo" in text and "make test" in text  # the two commands; .ci/run calls `make test`


@pytest.mark.parametrize("doc", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_marked_figure_is_in_its_results_file(doc):
    assert missing_figures(doc.read_text()) == []


def test_readme_has_no_figure_outside_a_marked_block():
    assert unsourced_figures(README.read_text()) == []


@pytest.mark.parametrize("doc", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert broken == []


def test_results_files_name_their_source():
    files = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert files
    for path in files:
        source = json.loads(path.read_text()).get("source")
        assert isinstance(source, str) and source.strip(), f"{path.name} has no source"


def test_the_check_fails_on_a_figure_that_is_not_in_its_file():
    ok = "<!-- figures: docs/results/held_out.json -->\n| ours | 38.30 (+1.14) | 256x256x80 |\n"
    assert missing_figures(ok) == []
    assert missing_figures(ok.replace("38.30", "38.31")) == ["line 2: 38.31 is not in docs/results/held_out.json"]
    assert missing_figures(ok.replace("x80", "x81")) == ["line 2: 81 is not in docs/results/held_out.json"]
    assert missing_figures(ok.replace("held_out", "nowhere"))[0].startswith("marker names docs/results/nowhere")
    assert unsourced_figures("Gains +1.14 dB.\n") == ["line 1: +1.14 outside a marked block"]
    assert unsourced_figures("It takes 8 min.\n") == ["line 1: 8 min outside a marked block"]
    assert unsourced_figures("Python 3.10+, `--spacing 1.0`, LIDC-IDRI-0314, 5 mm -> 1 mm\n") == []
