"""streamjax: StreamingLLM (attention sinks + rolling window KV cache) in pure JAX."""

import pathlib

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in (pathlib.Path(__file__).parent / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="streamjax",
    version="0.1.0",
    description="StreamingLLM (Efficient Streaming Language Models with Attention Sinks) in pure JAX",
    packages=find_packages(include=["streamjax", "streamjax.*", "experiments", "configs"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # torch is the reference the tests check against, never a runtime dependency.
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "accelerate>=1.0",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6",
            "openai>=1.50",  # the official client the server tests talk to
            "ruff==0.17.6",  # lint and format check (scripts/test.sh); pinned: formatting changes between versions
        ],
    },
)
