"""Inference: exact upsample + threshold, TTA, sliding windows, streaming ensembles."""
