"""modsquad: multi-task vision with mixture-of-experts Vision Transformers."""

from .core.version import __version__


def create_model(name: str, tasks, img_size: int = 224, **overrides):
    """Build a named preset for `tasks`, e.g. `create_model("modsquad_vit_s", tasks=["depth_euclidean", "normal"])`.

    `overrides` replace preset values (any `modsquad.models.MultiTaskViT` argument). See `modsquad.models`.
    """
    # imported here so that `import modsquad` (and the CLI) stays light
    from .models.registry import create_model as _create_model

    return _create_model(name, tasks, img_size=img_size, **overrides)


def load_model(run, map_location="cpu"):
    """Load a full multi-task model from a run directory (its best, else last checkpoint) or a .safetensors
    checkpoint, in eval mode: `model = modsquad.load_model("runs/tiny"); preds = model(images)`."""
    from .checkpoint import load_model as _load_model

    return _load_model(run, map_location=map_location)


def load_extracted(path, **kwargs):
    """Load a single-task model written by `modsquad extract` (a directory); returns an nn.Module."""
    from .extract.extracted import load_extracted as _load_extracted

    return _load_extracted(path, **kwargs)


__all__ = ["__version__", "create_model", "load_extracted", "load_model"]
