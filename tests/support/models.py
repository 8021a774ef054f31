"""Tiny random Hugging Face models built in memory, their streamjax twins, and tiny tokenizers saved to disk."""

from __future__ import annotations

import os

import numpy as np


def cpu_devices_env(count: int = 8) -> dict[str, str]:
    """Environment of a child process whose JAX has `count` CPU devices (XLA fixes the count at start)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def random_hf_llama(seed: int = 0, std: float = 0.2, **overrides):
    """A tiny `LlamaForCausalLM` with random weights (large enough std that errors would show)."""
    import torch
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


def randomize_weights(model, std: float, norm_mean: float = 1.0):
    """Every weight of a transformers model ~ N(0, std), LayerNorm and RMSNorm weights `norm_mean` + N(0, std)
    (Gemma's norms, which multiply by 1 + w: `norm_mean` 0); eval mode."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            for name, parameter in module.named_parameters(recurse=False):
                parameter.normal_(0.0, std)
                if is_norm and name == "weight":
                    parameter.add_(norm_mean)
    return model.eval()


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


def to_streamjax(model):
    """(config, params) of a Hugging Face model, through streamjax's own converter."""
    from streamjax.files.weights import convert_tensors
    from streamjax.model import families

    config = families.config_from_hf(model.config.to_dict())
    return config, convert_tensors(hf_state_dict(model), config)


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def save_word_tokenizer(directory, vocab_size: int) -> None:
    """A word-level tokenizer whose words "w1".."w{vocab_size - 1}" are token ids 1.. (0 is [UNK]), saved
    with `save_pretrained`, so a text of such words is its own token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_byte_tokenizer(directory, specials_first: bool = False) -> dict[str, int]:
    """A byte-level tokenizer without merges (ids 0..255 are the bytes, in GPT-2's byte-to-unicode order)
    with "<|im_start|>" (256) and "<|im_end|>" (257), saved with `save_pretrained`; any text tokenizes.
    With `specials_first`, SmolLM2's layout instead: "<|endoftext|>" 0, "<|im_start|>" 1, "<|im_end|>" 2,
    then byte b as id 3 + b. Returns the special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from streamjax.files.gguf import bytes_to_unicode

    alphabet = bytes_to_unicode()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if specials_first else ["<|im_start|>", "<|im_end|>"]
    first_byte = len(specials) if specials_first else 0
    ids = {token: index if specials_first else 256 + index for index, token in enumerate(specials)}
    vocab = {**(ids if specials_first else {}), **{alphabet[byte]: first_byte + byte for byte in range(256)}}
    backend = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>").save_pretrained(directory)
    return ids
