"""Training: the loop, its losses, optimizer, checkpoints and metrics."""

from longseq.train.trainer import TrainingDiverged, TrainingInterrupted, evaluate_run, run_directory, train

__all__ = ["train", "evaluate_run", "run_directory", "TrainingDiverged", "TrainingInterrupted"]
