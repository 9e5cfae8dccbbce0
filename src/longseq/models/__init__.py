"""Models: a decoder LM and a sequence classifier over one shared backbone, and their factory."""

from __future__ import annotations

from typing import Literal

from flax import nnx

from longseq.config import KernelsConfig, ModelConfig
from longseq.layers.remat import Remat
from longseq.models.backbone import Backbone
from longseq.models.classifier import SequenceClassifier, masked_mean
from longseq.models.lm import DecoderLM
from longseq.parallel import SequenceParallel

__all__ = ["Backbone", "DecoderLM", "SequenceClassifier", "build_model", "masked_mean"]


def build_model(model_config: ModelConfig, kernels_config: KernelsConfig, *,
                kind: Literal["lm", "classification"], vocab_size: int, num_classes: int | None = None,
                seq_len: int, rngs: nnx.Rngs,
                sequence_parallel: SequenceParallel | None = None,
                remat: Remat = Remat()) -> DecoderLM | SequenceClassifier:
    """The model for a task kind: "lm" → DecoderLM, "classification" → SequenceClassifier.

    num_classes is required for (and only used by) "classification". sequence_parallel: attention
    layers run `longseq.parallel` attention on that mesh plan (None = single-device ops). remat: what
    each residual block keeps for the backward pass (`longseq.layers.remat`).
    """
    if kind == "lm":
        return DecoderLM(model_config, kernels_config, vocab_size=vocab_size, seq_len=seq_len, rngs=rngs,
                         sequence_parallel=sequence_parallel, remat=remat)
    if kind == "classification":
        if num_classes is None:
            raise ValueError("num_classes: required for kind='classification'")
        return SequenceClassifier(model_config, kernels_config, vocab_size=vocab_size,
                                  num_classes=num_classes, seq_len=seq_len, rngs=rngs,
                                  sequence_parallel=sequence_parallel, remat=remat)
    raise ValueError(f"kind: expected 'lm' or 'classification', got {kind!r}")
