"""Feeding and generating: what a stream of tokens does with a model and its cache (reads no file).

feed            step, prefill (chunked), feed_tokens, token_route: tokens in, logits and cache out
perplexity      EvalSpec and the streaming NLL of a text: dense, window, streaming, recompute
generation      the on-device decode loop (generate), with sampling and stop conditions inside
sampling        temperature, top-k, top-p, min-p, repetition penalty, per stream
stopping        end ids, token limits and stop strings, checked on device
token_bytes     the bytes each token id stands for (for stop strings)
templates       rendering chat templates (Jinja), as transformers does
chat            the chat library: a Conversation is one stream's cache and what was said
attention_maps  attention weights averaged over heads, and the share sinks get
"""
