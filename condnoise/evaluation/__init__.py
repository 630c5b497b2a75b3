"""Evaluation: feature extractors and metrics (paper section 5)."""
