"""Serving many conversations at once over HTTP: the batching engine and its OpenAI-compatible API.

engine  continuous batching of requests onto the slots of one batched sink cache; sessions saved to disk
api     the HTTP layer (FastAPI): OpenAI's chat and text completions, models, health and Prometheus metrics
"""
