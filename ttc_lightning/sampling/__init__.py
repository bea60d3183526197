"""Sampling completions: the sampler and its two backends (plain `generate()` and ttc's own), the decoding loop,
the KV caches."""
