"""The suite runs in the environment it claims: every package pinned in constraints.txt is installed at
its pinned version, and nothing else is installed besides streamjax and pip's own tools.

scripts/test.sh builds that environment; this test is what makes a run on any other environment (an
older transformers installed by hand, a package upgraded in place) fail instead of passing on versions
the README does not name.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = pathlib.Path(__file__).parent.parent / "constraints.txt"
NOT_PINNED = {"streamjax", "pip", "setuptools", "wheel"}  # the project itself and the venv's own tools


def pinned() -> dict[str, Requirement]:
    lines = [line.strip() for line in CONSTRAINTS.read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def installed() -> dict[str, str]:
    return {canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}


def test_constraints_pin_exact_versions():
    loose = [str(r) for r in pinned().values() if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "=="]
    assert not loose, f"constraints.txt must pin exact versions (name==version): {loose}"


def test_installed_versions_are_the_pinned_ones():
    have = installed()
    # A pin matches as pip matches it: torch==2.13.0 accepts its CPU build 2.13.0+cpu.
    wrong = [
        f"{name} {r.specifier} ({have.get(name, 'not installed')})"
        for name, r in pinned().items()
        if name not in have or not r.specifier.contains(have[name])
    ]
    assert not wrong, (
        f"{len(wrong)} installed versions differ from constraints.txt: {', '.join(wrong[:12])}; run the tests "
        "with `bash scripts/test.sh`, which builds the pinned environment"
    )


def test_nothing_unpinned_is_installed():
    extra = sorted(set(installed()) - set(pinned()) - NOT_PINNED)
    assert not extra, (
        f"{len(extra)} installed but not pinned in constraints.txt: {', '.join(extra[:12])}; pin them (a deliberate commit that runs the "
        "suite) or run the tests with `bash scripts/test.sh`"
    )
