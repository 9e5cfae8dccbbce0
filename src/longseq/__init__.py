"""longseq: a JAX research framework for long-sequence models."""

__version__ = "0.1.0"
