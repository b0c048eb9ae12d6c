"""modsquad: multi-task vision with mixture-of-experts Vision Transformers."""

__version__ = "0.1.0"


def create_model(name: str, tasks, img_size: int = 224, **overrides):
    """Build a named preset for `tasks`, e.g. `create_model("modsquad_vit_s", tasks=["depth_euclidean", "normal"])`.

    `overrides` replace preset values (any `modsquad.models.MultiTaskViT` argument). See `modsquad.models`.
    """
    # imported here so that `import modsquad` (and the CLI) stays light
    from .models.registry import create_model as _create_model

    return _create_model(name, tasks, img_size=img_size, **overrides)


def load_extracted(path, **kwargs):
    """Load a single-task model written by `modsquad extract` (a directory); returns an nn.Module."""
    from .extract.standalone import load_extracted as _load_extracted

    return _load_extracted(path, **kwargs)
