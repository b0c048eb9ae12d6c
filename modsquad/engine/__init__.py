"""Training engine: trainer, checkpoints, distributed helpers, loss weighting (import the submodules)."""

from .evaluate import evaluate
from .trainer import train

__all__ = ["evaluate", "train"]
