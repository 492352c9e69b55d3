"""Benchmarks: our VLM against transformers' LLaVA built from the very same weights."""
