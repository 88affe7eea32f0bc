"""Concept-aware fine-tuning (CAFT): multi-token prediction heads for fine-tuning causal LMs."""

__version__ = "0.1.0"
