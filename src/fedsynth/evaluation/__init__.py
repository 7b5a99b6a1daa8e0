"""Judging synthetic data: feature-space metrics and downstream classification."""
