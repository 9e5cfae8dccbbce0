"""Data tasks: deterministic, resumable batch streams for long-sequence models.

    task = make_task(config.data)                 # a Task
    for step, batch in enumerate(batches(task, "train", config.data.batch_size, start=resume_step)): ...
    evaluation = eval_set(task, config.data)      # the fixed eval batches

See `longseq.data.task` for the batch layout and each task's module for its exact format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longseq.data.induction_heads import InductionHeadsTask
from longseq.data.listops import ListOpsTask
from longseq.data.mqar import MQARTask
from longseq.data.selective_copying import SelectiveCopyingTask
from longseq.data.task import SPLIT_CODES, Task, batches, eval_set
from longseq.data.text import TextTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in
                                (MQARTask, InductionHeadsTask, SelectiveCopyingTask, ListOpsTask, TextTask)}


def make_task(config: Any, run_dir: Path | None = None) -> Task:
    """The task named by `config.task`, built from a `longseq.config.DataConfig`; run_dir: the run
    directory whose saved task files (e.g. the text task's tokenizer) it reloads when they exist."""
    cls = TASKS.get(config.task)
    if cls is None:
        raise ValueError(f"data.task: unknown task {config.task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return cls.from_config(config, run_dir=run_dir)


__all__ = ["TASKS", "SPLIT_CODES", "Task", "make_task", "batches", "eval_set", "MQARTask", "InductionHeadsTask",
           "SelectiveCopyingTask", "ListOpsTask", "TextTask"]
