"""The README and the topic pages under docs/: every number of their result tables is found in the committed
file they name for it, and every image and link into docs/ resolves.

The documents are README.md and every .md file under docs/ except the run outputs the experiments write
there (`results.md`, `replies.md`), which are the sources. A result table is a markdown table with at
least one numeric cell (numbers and nothing else but "/", "±", "x", "%", brackets, ".." ranges and a
unit). Between the section's heading and the table, the document names its source on a line
`Source: `path`, `path`` (files or directories, relative to the repository root; a directory stands for
every .md and .json file in it), which holds for the tables after it until the next heading or `Source: `
line. Each number of each numeric cell must be found in those files: as a number written there with the
same digits, or a number stored there that prints as it at the document's number of decimals (a JSON float
18.51923 is the README's 18.519).

Links: every image (`![alt](path)`) and every link whose target lies under docs/ or is a markdown file
resolves from the document's own folder, and its `#anchor`, if any, names a heading of the target; every
`docs/...` path written in backticks exists. Links and backticked paths into the code are not checked
here (the code's paths are the layout test's business).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_OUTPUTS = {"results.md", "replies.md"}  # the markdown the experiments write into their workdirs
DOCUMENTS = [ROOT / "README.md"] + sorted(
    path for path in (ROOT / "docs").rglob("*.md") if path.name not in RUN_OUTPUTS
)
NUMBER = re.compile(r"(?<![\d,.])(?<!\d\.)\d[\d,]*(?:\.\d+)?|(?<=\.\.)\d[\d,]*(?:\.\d+)?")
NUMERIC_REST = set(" /±().,%x")  # what may stand in a numeric cell besides its numbers (and a unit)
UNIT = re.compile(r"(?:ms|s|MiB)\s*$")
SOURCE = re.compile(r"^Source: (.+)$")


def tables(text: str) -> list[tuple[int, list[str], list[pathlib.Path]]]:
    """(line number, table lines, source paths) of every markdown table of `text`."""
    found, sources, rows, start = [], [], [], 0
    for number, line in enumerate(text.splitlines() + [""], 1):
        if line.startswith("|"):
            start = start or number
            rows.append(line)
            continue
        if rows:
            found.append((start, rows, sources))
            rows, start = [], 0
        if line.startswith("#"):
            sources = []
        match = SOURCE.match(line)
        if match:
            sources = [ROOT / path for path in re.findall(r"`([^`]+)`", match.group(1))]
    return found


def numeric_cells(rows: list[str]) -> list[str]:
    """The numeric cells of a table's body (its header and separator rows left out)."""
    cells = [cell.strip() for row in rows[2:] for cell in row.strip().strip("|").split("|")]
    return [cell for cell in cells if NUMBER.search(cell) and set(UNIT.sub("", NUMBER.sub("", cell))) <= NUMERIC_REST]


def source_files(paths: list[pathlib.Path]) -> list[pathlib.Path]:
    files = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.suffix in (".md", ".json")) if path.is_dir() else [path]
    return files


def source_numbers(files: list[pathlib.Path]) -> tuple[set[str], list[float]]:
    """(numbers as written in the files, without thousands separators; every number as a float)."""
    written: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int | float):
            written.add(repr(value))
        elif isinstance(value, str):
            written.update(token.replace(",", "") for token in NUMBER.findall(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in files:
        walk(json.loads(path.read_text()) if path.suffix == ".json" else path.read_text())
    return written, [float(token) for token in written]


def found(token: str, written: set[str], values: list[float]) -> bool:
    plain = token.replace(",", "")
    if plain in written:
        return True
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    return any(f"{value:.{decimals}f}" == plain for value in values)


def name(document: pathlib.Path) -> str:
    return str(document.relative_to(ROOT))


def result_tables():
    for document in DOCUMENTS:
        for line, rows, sources in tables(document.read_text()):
            if numeric_cells(rows):
                yield pytest.param(document, line, rows, sources, id=f"{name(document)}:{line}")


@pytest.mark.parametrize(("document", "line", "rows", "sources"), list(result_tables()))
def test_every_number_of_a_result_table_is_in_its_source(document, line, rows, sources):
    assert sources, f"{name(document)} line {line}: a result table needs a `Source: ` line naming its files"
    missing_files = [str(path.relative_to(ROOT)) for path in sources if not path.exists()]
    assert not missing_files, f"{name(document)} line {line}: sources not committed: {missing_files}"
    written, values = source_numbers(source_files(sources))
    tokens = [token for cell in numeric_cells(rows) for token in NUMBER.findall(cell)]
    absent = [token for token in tokens if not found(token, written, values)]
    assert not absent, f"{name(document)} line {line}: numbers not found in {[str(s) for s in sources]}: {absent}"


LINK = re.compile(r"(!?)\[[^\]]*\]\(([^()\s]+)\)")
DOCS_PATH = re.compile(r"`(docs/[^`\s]*)`")


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def broken_links(document: pathlib.Path, root: pathlib.Path) -> list[str]:
    """The images, links into `root`/docs or to markdown files, and backticked `docs/` paths of `document`
    that do not resolve (a link from the document's folder, a backticked path from `root`)."""
    text, broken = document.read_text(), []
    for bang, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path_part, _, fragment = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        checked = bang or path.suffix == ".md" or path.is_relative_to((root / "docs").resolve())
        if checked and not path.exists():
            broken.append(target)
        elif checked and fragment and path.suffix == ".md":
            headings = [line for line in path.read_text().splitlines() if line.startswith("#")]
            if fragment not in {anchor(heading) for heading in headings}:
                broken.append(target)
    broken += [path for path in DOCS_PATH.findall(text) if not (root / path).exists()]
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=name)
def test_every_image_and_docs_link_resolves(document):
    assert not broken_links(document, ROOT), f"{name(document)}: links that do not resolve"


def test_every_topic_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(ROOT / target).resolve() for _, target in LINK.findall(readme.read_text())}
    unlinked = [name(page) for page in DOCUMENTS[1:] if page.resolve() not in linked]
    assert DOCUMENTS[1:] and not unlinked, f"topic pages the README does not link: {unlinked}"


def test_every_config_and_program_a_document_names_exists():
    """`configs/<name>.py` and `python -m experiments.<name>` in any document name real files."""
    missing = []
    for document in DOCUMENTS:
        text = document.read_text()
        configs = {f"configs/{config}" for config in re.findall(r"configs/([a-z_0-9]+\.py)", text)}
        programs = {f"experiments/{program}.py" for program in re.findall(r"experiments\.([a-z_]+)", text)}
        missing += [f"{name(document)}: {path}" for path in sorted(configs | programs) if not (ROOT / path).is_file()]
    assert not missing, missing


def test_the_link_checker_finds_what_does_not_resolve(tmp_path):
    (tmp_path / "docs" / "topic").mkdir(parents=True)
    (tmp_path / "docs" / "topic" / "plot.png").write_bytes(b"png")
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Reliability: what a run survives\n")
    page = tmp_path / "docs" / "topic" / "README.md"
    page.write_text(
        "![ok](plot.png) ![gone](docs/topic/plot.png) [ok](../page.md) [gone](../other.md)\n"
        "[ok](../page.md#reliability-what-a-run-survives) [gone](../page.md#reliability) [web](https://x.org/a.md)\n"
        "[code, not checked](../../streamjax/model/cache.py) `docs/topic/plot.png` `docs/long_stream/`\n"
    )
    assert broken_links(page, tmp_path) == [
        "docs/topic/plot.png",
        "../other.md",
        "../page.md#reliability",
        "docs/long_stream/",
    ]


def test_the_checker_finds_and_misses_what_it_should(tmp_path):
    (tmp_path / "results.md").write_text("| run | ppl |\n|---|---:|\n| dense | 18.519 |\n| big | 1000000 |\n")
    (tmp_path / "summary.json").write_text(json.dumps({"runs": [{"ppl": 27.48123, "seconds": 48.46}]}))
    written, values = source_numbers(source_files([tmp_path]))
    for token in ("18.519", "1,000,000", "27.481", "27.5", "48.5", "48.46"):
        assert found(token, written, values), token
    for token in ("18.51", "27.482", "48.47", "3"):
        assert not found(token, written, values), token
    assert NUMBER.findall("5.3085 (5.1256..5.4504) 1,000 / 2x") == ["5.3085", "5.1256", "5.4504", "1,000", "2"]
    assert numeric_cells(["| a | b | c |", "|---|---|---|", "| 4+1020 | 5.3 (5.1..5.4) | 68.7 ms |"]) == [
        "5.3 (5.1..5.4)",
        "68.7 ms",
    ]
    text = "## A\nSource: `docs/x.md`\n\n| a | b |\n|---|---:|\n| r | 1.5 / 2 |\n| s | text |\n\n## B\n| c |\n|---|\n| 2 |\n"
    (first, rows, sources), (_, second_rows, second_sources) = tables(text)
    assert first == 4 and sources == [ROOT / "docs/x.md"] and numeric_cells(rows) == ["1.5 / 2"]
    assert second_sources == [] and numeric_cells(second_rows) == ["2"]


def test_a_fresh_stream_from_token_0_is_bitwise_the_long_streams_start():
    """docs/ppl/README.md's control claim, on the committed files: the control's stream started at 0 (10,240
    tokens) and the first 20,480 tokens of the long stream's configuration predict the same tokens alike."""
    fresh = np.load(ROOT / "docs/ppl/long_stream/control/streaming-from 0/nll.npy")
    long = np.load(ROOT / "docs/ppl/long_stream/first_20480/streaming-4+1020/nll.npy")
    assert fresh.shape == (10_239,) and long.shape == (20_479,)
    np.testing.assert_array_equal(fresh, long[: fresh.shape[0]])
