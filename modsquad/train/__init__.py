"""Training: the loop (`trainer.py`) and its collaborators (optimizer, data order, adding tasks).

    from modsquad.train import train, train_add_tasks
    result = train(load_config("configs/synthetic_tiny.yaml"), out="runs/tiny")
"""

from .trainer import TrainResult, train
from .transfer import train_add_tasks

__all__ = ["TrainResult", "train", "train_add_tasks"]
