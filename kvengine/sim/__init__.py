"""Trace replay: prefix-cache hit rates per eviction policy and router, without a model."""
