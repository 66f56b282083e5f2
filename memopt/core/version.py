"""memopt's version (here, at the bottom of the layers, so that every layer may name it)."""

__version__ = "0.1.0"
