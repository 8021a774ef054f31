"""transformers' own outputs for a real GGUF file: the reference of the real-model logit tests."""

from __future__ import annotations

import pathlib

import numpy as np

from streamjax.files import corpora


def transformers_gguf_logits(
    path: pathlib.Path, num_tokens: int, corpus: str = "austen"
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [1, T] int32, logits [1, T, V] float32) of transformers' load of the GGUF file at `path`
    (`from_pretrained(dir, gguf_file=name)`, float32 on the CPU, eager attention: the model's own sliding
    layers) over the first T = `num_tokens` tokens of `corpus`, tokenized by transformers' GGUF tokenizer
    (a BOS first where the file asks for one)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokens = corpora.load_corpus_tokens(corpus, tokenizer, num_tokens=num_tokens)[None].astype(np.int32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits
    return tokens, logits.numpy()
