"""Per-task extraction: expert usage, the experts each task keeps, extracted models, ONNX export.

    report = compute_usage("runs/x")                                   # usage.json dict
    results = write_extracted("runs/x", "out/extracted", onnx=True)    # OUT/<task>/{model.safetensors, config.json}
    extracted = load_extracted("out/extracted/depth_euclidean")        # extracted(images) -> Tensor

Submodules: `usage` (counting, usage.json / usage.png), `prune` (expert selection and slicing:
`extract_task_model`), `extracted` (the extracted model, its folder format, folding of task-level routing, saving
and loading), `export` (`extract_model` in memory, `write_extracted` to folders, ONNX).
"""

from ..moe import FoldedMoEAttention
from .export import export_onnx, extract_model, write_extracted
from .extracted import ExtractedModel, fold_moe_layers, load_extracted, save_extracted
from .prune import check_selection, count_params, extract_task_model, select_experts, select_layer_experts
from .usage import compute_usage, count_usage, load_usage, save_usage

__all__ = [
    "ExtractedModel", "FoldedMoEAttention", "check_selection", "compute_usage", "count_params", "count_usage",
    "export_onnx", "extract_model", "extract_task_model", "fold_moe_layers", "load_extracted", "load_usage",
    "save_extracted", "save_usage", "select_experts", "select_layer_experts", "write_extracted",
]
