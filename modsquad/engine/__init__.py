"""Training engine: trainer, checkpoints, distributed helpers, loss weighting (import the submodules)."""

from .evaluate import evaluate  # noqa: E402
from .trainer import train  # noqa: E402

__all__ = ["evaluate", "train"]
