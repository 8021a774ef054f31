"""Shared fixtures: tiny random Hugging Face models built in memory, converted to streamjax params."""

from __future__ import annotations

import os

import numpy as np
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "real_assets: needs the SmolLM2 GGUF and the Austen corpus (fetched once)")


def cpu_devices_env(count: int = 8) -> dict[str, str]:
    """Environment of a child process whose JAX has `count` CPU devices (XLA fixes the count at start)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch is the test-only reference")


def random_hf_llama(seed: int = 0, std: float = 0.2, **overrides):
    """A tiny `LlamaForCausalLM` with random weights (large enough std that errors would show)."""
    torch = torch_or_skip()
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }  # fmt: skip
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def randomize_weights(model, std: float):
    """Every weight of a transformers model ~ N(0, std), LayerNorm weights 1 + N(0, std); eval mode."""
    torch = torch_or_skip()
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                parameter.normal_(0.0, std)
                if isinstance(module, torch.nn.LayerNorm) and name == "weight":
                    parameter.add_(1.0)
    return model.eval()


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


def to_streamjax(model):
    """(config, params) of a Hugging Face model, through streamjax's own converter."""
    from streamjax import families
    from streamjax.weights import convert_tensors

    config = families.config_from_hf(model.config.to_dict())
    return config, convert_tensors(hf_state_dict(model), config)


def hf_logits(model, tokens) -> np.ndarray:
    torch = torch_or_skip()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()
