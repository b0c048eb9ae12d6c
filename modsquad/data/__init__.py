"""Datasets: Taskonomy, PASCAL-Context and the built-in synthetic suite, joint transforms and data checks.

Names are imported on first use, so that `modsquad.data.synthetic` (and its render worker processes) does not pay
for torch and albumentations.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_dataset": ".loader",
    "check_dataset": ".check", "DataCheckReport": ".check", "DomainReport": ".check",
    "PascalContextDataset": ".pascal_context",
    "TaskonomyDataset": ".taskonomy",
    "JointTransform": ".transforms", "HorizontalFlipNormals": ".transforms",
    "synthesize": ".synthetic", "render_sample": ".synthetic", "SynthSummary": ".synthetic",
    "SYNTHETIC_DOMAINS": ".synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    value = getattr(module, "DOMAINS" if name == "SYNTHETIC_DOMAINS" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
