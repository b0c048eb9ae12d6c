"""Tasks: what each task predicts, how it is decoded from disk, its loss and its metrics."""

from .registry import TASKS, TaskSpec, get_task, list_tasks, register_task

__all__ = ["TASKS", "TaskSpec", "get_task", "list_tasks", "register_task"]
