"""memopt: memory profiler and optimizer for Transformer language models."""

__version__ = "0.1.0"
