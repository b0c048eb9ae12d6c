"""Pruned vs full benchmark: `benchmark(...)` measures, `write_report(...)` writes bench.json/md/png."""

from .bench import (
    DEFINITIONS,
    FIELDS,
    benchmark,
    count_flops,
    count_params,
    peak_memory_mb,
    task_param_count,
    time_interleaved,
)
from .report import markdown, plot, summary_table, write_report

__all__ = ["DEFINITIONS", "FIELDS", "benchmark", "count_flops", "count_params", "markdown", "peak_memory_mb", "plot",
           "summary_table", "task_param_count", "time_interleaved", "write_report"]
