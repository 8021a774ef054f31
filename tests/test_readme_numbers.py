"""Every number in the README's result tables is found in the committed file the README names for it.

A result table is a markdown table with at least one numeric cell (numbers and nothing else but "/",
"±", "x", "%", brackets, ".." ranges and a unit). Between the section's heading and the table, the README names its
source on a line `Source: `path`, `path`` (files or directories under the repository; a directory stands
for every .md and .json file in it), which holds for the tables after it until the next heading or
`Source: ` line. Each number of each numeric cell must be found in
those files: as a number written there with the same digits, or a number stored there that prints as it
at the README's number of decimals (a JSON float 18.51923 is the README's 18.519).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md"]
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


def result_tables():
    for document in DOCUMENTS:
        for line, rows, sources in tables(document.read_text()):
            if numeric_cells(rows):
                yield pytest.param(document, line, rows, sources, id=f"{document.name}:{line}")


@pytest.mark.parametrize(("document", "line", "rows", "sources"), list(result_tables()))
def test_every_number_of_a_result_table_is_in_its_source(document, line, rows, sources):
    assert sources, f"{document.name} line {line}: a result table needs a `Source: ` line naming its files"
    missing_files = [str(path.relative_to(ROOT)) for path in sources if not path.exists()]
    assert not missing_files, f"{document.name} line {line}: sources not committed: {missing_files}"
    written, values = source_numbers(source_files(sources))
    tokens = [token for cell in numeric_cells(rows) for token in NUMBER.findall(cell)]
    absent = [token for token in tokens if not found(token, written, values)]
    assert not absent, f"{document.name} line {line}: numbers not found in {[str(s) for s in sources]}: {absent}"


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
