r"""Attention maps (`python -m experiments.attention`, `experiments/attention.py`): the paper's Figure 2, where
each layer's attention goes, averaged over heads and short texts, and the share the first token gets.

Gemma 3 270M, its global layers 5, 11, 17 beside the sliding (local) layers 0, 4, 10 (docs/ppl/gemma3_attention/):

    python -m experiments.attention --config=configs/attention.py --workdir=/tmp/streamjax/gemma3_attention

The same texts with an ordinary word first, no <bos> (docs/ppl/gemma3_attention/no_bos/):

    python -m experiments.attention --config=configs/attention.py --workdir=/tmp/streamjax/gemma3_attention_no_bos \
        --config.bos=False

SmolLM2-135M-Instruct, the picture of notebooks/attention_sinks.ipynb (the same shares: 12.7%, 11.1%, 34.2%, 71.3%,
59.2% on the first token in layers 0, 1, 2, 15, 29; SmolLM2 has no <bos>):

    python -m experiments.attention --config=configs/attention.py --workdir=/tmp/streamjax/smollm2_attention \
        --config.model=smollm2 --config.layers=0,1,2,15,29
"""

import ml_collections


def get_config(arg=None):
    """The default: Gemma 3 270M over 256 texts of 16 Austen tokens (the paper's 256 sentences of 16 tokens)."""
    del arg
    config = ml_collections.ConfigDict()
    config.model = "gemma3"  # "smollm2", "gemma3", a .gguf file or a checkpoint directory
    config.data = "austen"  # a corpus spec of `streamjax.files.corpora` (e.g. "mobydick", a .txt file)
    config.layers = "0,4,5,10,11,17"  # comma-separated layer indices, one panel each
    config.num_texts = 256  # consecutive pieces of the text
    config.length = 16  # tokens per text, the leading special tokens included
    # Each text starts with the tokenizer's leading special tokens (Gemma's <bos>, as every text the model was
    # trained on; none for SmolLM2); False: the text's own first token stands first.
    config.bos = True
    config.dtype = "float32"
    return config
