"""Training: the loop (`trainer.py`) and its collaborators: build (model, data), objective (the loss), state
(checkpoints, RNG), best (scoring), sinks (jsonl, csv, TensorBoard, console, progress bar), hooks (freezing),
optim, distributed (data order), transfer (adding tasks). See docs/architecture.md.

    from modsquad.train import train, train_add_tasks
    result = train(load_config("synthetic_tiny"), out="runs/tiny")
"""

from .trainer import TrainResult, train
from .transfer import train_add_tasks

__all__ = ["TrainResult", "train", "train_add_tasks"]
