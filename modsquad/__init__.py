"""modsquad: multi-task vision with mixture-of-experts Vision Transformers."""

__version__ = "0.1.0"
