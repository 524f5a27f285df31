"""piformer: language models for private inference."""
__version__ = "0.1.0"
