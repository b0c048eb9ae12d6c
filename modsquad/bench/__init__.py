"""Extracted vs full vs dense timm benchmark: `benchmark(...)` measures, `write_report(...)` writes bench.json/md/png."""

from .bench import (
    DEFINITIONS,
    FIELDS,
    DenseTimmBaseline,
    benchmark,
    count_flops,
    count_params,
    dense_timm_baseline,
    peak_memory_mb,
    task_param_count,
    time_interleaved,
)
from .report import markdown, plot, summary_table, write_report

__all__ = ["DEFINITIONS", "FIELDS", "DenseTimmBaseline", "benchmark", "count_flops", "count_params",
           "dense_timm_baseline", "markdown", "peak_memory_mb", "plot", "summary_table", "task_param_count",
           "time_interleaved", "write_report"]
