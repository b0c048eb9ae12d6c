"""Per-task extraction: expert usage, pruning to the experts a task uses, standalone models, ONNX export.

    report = compute_usage("runs/x")                                   # usage.json dict
    results = extract("runs/x", "out/extracted", onnx=True)            # OUT/<task>/{model.safetensors, config.json}
    sub = load_extracted("out/extracted/depth_euclidean")              # sub(images) -> Tensor

Submodules: `usage` (counting, usage.json / usage.png), `prune` (expert selection and slicing), `standalone`
(the extracted module, folding of task-level routing, loading), `export` (writing directories, ONNX).
"""

from ..moe import FoldedMoEAttention
from .export import export_onnx, extract, save_extracted
from .prune import check_selection, count_params, extract_task, select_experts, select_layer_experts
from .standalone import ExtractedModel, fold_moe_layers, load_extracted
from .usage import compute_usage, count_usage, load_usage, save_usage

__all__ = [
    "ExtractedModel", "FoldedMoEAttention", "check_selection", "compute_usage", "count_params", "count_usage",
    "export_onnx", "extract", "extract_task", "fold_moe_layers", "load_extracted", "load_usage", "save_extracted",
    "save_usage", "select_experts", "select_layer_experts",
]
