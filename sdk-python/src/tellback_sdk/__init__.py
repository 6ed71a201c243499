"""Tellback Python SDK (the client surface lands with its own issue)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
