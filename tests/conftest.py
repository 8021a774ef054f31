"""Shared fixtures: tiny random Hugging Face models built in memory, converted to streamjax params; the
real assets (SmolLM2 and Gemma 3 GGUFs, Austen text) for tests marked `real_assets`.

Missing is a failure: torch, transformers and the other test extras are imported plainly (the test
command installs them), and a real asset that cannot be fetched fails its test. Only with
STREAMJAX_ALLOW_MISSING_ASSETS=1 do tests whose asset cannot be fetched skip instead.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import pytest

from streamjax.files import assets

ALLOW_MISSING_ASSETS = "STREAMJAX_ALLOW_MISSING_ASSETS"
TESTS = pathlib.Path(__file__).resolve().parent
# Child processes (killed runs, 8-device runs, entry points) import the test helpers (`support`) and this
# checkout's code as the tests do (pytest.ini puts tests/ on the tests' own path).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS), str(TESTS.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drop JAX's compiled programs when each test module ends. The suite runs in one process; a full run
    that kept every module's programs (6.4 GB resident at 90%) once crashed inside XLA's CPU compiler."""
    yield
    import jax

    jax.clear_caches()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_assets: needs the SmolLM2 or Gemma 3 GGUF and the Austen corpus (fetched once)"
    )


def require_asset(locate: Callable[[], pathlib.Path]) -> pathlib.Path:
    """`locate()` (a path function of `streamjax.files.assets`); if the asset cannot be fetched, fail the test,
    or skip it when the environment sets STREAMJAX_ALLOW_MISSING_ASSETS=1."""
    try:
        return locate()
    except assets.AssetError as error:
        if os.environ.get(ALLOW_MISSING_ASSETS) == "1":
            pytest.skip(f"asset missing, skipped as {ALLOW_MISSING_ASSETS}=1: {error}")
        pytest.fail(
            f"asset missing: {error}\nFetch it with `python -m streamjax.files.assets`; to skip the tests that need it "
            f"instead, set {ALLOW_MISSING_ASSETS}=1.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (`assets.smollm2_gguf_path`), fetched once."""
    return require_asset(assets.smollm2_gguf_path)


@pytest.fixture(scope="session")
def gemma3_gguf() -> pathlib.Path:
    """The Gemma 3 270M Q4_K_M GGUF (`assets.gemma3_gguf_path`), built once from its four pieces."""
    return require_asset(assets.gemma3_gguf_path)


@pytest.fixture(scope="session")
def austen_text() -> pathlib.Path:
    """The Austen corpus file (`assets.austen_text_path`), fetched once."""
    return require_asset(assets.austen_text_path)
