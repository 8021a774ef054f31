"""The math of a streaming model: reads no file and knows no tokenizer.

config       ModelConfig, the one description of a model every function takes (static, hashable)
params       ParamSpec per leaf (shape, init, logical axes), init_params
positions    RoPE tables and ALiBi slopes, indexed by cache-relative positions
cache        SinkCache (sinks + rolling window), init_cache, the chunk plan, write_chunk
attention    one attention function over the cache plan (dense, sink + window, sink softmaxes)
transformer  the forward pass: forward (jitted) and apply, one program for every caller
families     llama, mpt, gpt_neox, falcon: a short written protocol each family implements
jit          model_jit (static model config) and the persistent compilation cache
sharding     device meshes and the logical-axis rules for params and cache
costs        bytes and FLOPs one token costs a model
"""
