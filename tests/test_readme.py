"""The README's Python example runs as written, and the commands it names exist."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n((?:    .*\n|\n)+)", section).group(1)
    return "\n".join(line[4:] for line in block.splitlines())


@pytest.mark.real_assets
def test_python_example_runs(smollm2_gguf, austen_text):
    namespace: dict = {}
    exec(compile(python_example(), str(README), "exec"), namespace)
    assert namespace["logits"].shape == (1, 1, namespace["config"].vocab_size)
    nll = namespace["nll"]
    assert nll.shape == (1999,) and 2.0 < float(np.mean(nll)) < 4.0
    result = namespace["result"]
    fed = len(namespace["prompts"][0]) + len(result.tokens[0])
    assert 1 <= len(result.tokens[0]) <= 20 and int(result.cache.next_position[0]) == fed


def test_readme_set_up_commands_point_at_real_files():
    text = README.read_text()
    root = README.parent
    assert "bash scripts/test.sh" in text and (root / "scripts" / "test.sh").is_file()
    assert "bash scripts/test.sh" in (root / ".ci" / "run").read_text()
    for config in set(re.findall(r"configs/([a-z_0-9]+\.py)", text)):
        assert (root / "configs" / config).is_file(), config
