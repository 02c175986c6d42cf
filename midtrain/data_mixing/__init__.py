"""Data mixing: ingest and tokenize corpora, indexed datasets, mixture specs, plans and the sampler.

This package imports nothing from training, launch, checkpoints or evaluation.
"""
