"""The typed configuration tree: the single source of every default.

A run is described by one `Config` (sections `model`, `data`, `optim`, `train`, `mesh`, `kernels`).
YAML files set any subset of it, may `extends:` a base file, and `key.sub=value` overrides from the
command line go on top. Everything is checked here, before JAX compiles anything:

- unknown keys (named, with the closest valid key suggested),
- wrong types (`model.d_model: expected an integer, got 'big'`),
- out-of-range values (`optim.lr: must be > 0, got -1`),
- inconsistent combinations (`model.d_model=100 is not divisible by model.num_heads=3`).

Every error is a `ConfigError` whose message starts with the dotted key it is about.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Sequence-parallel strategies that run each block's backward from merged statistics
# (`longseq.ops.attention_backward`), which kernels.attention=xla cannot.
BACKWARD_FROM_STATISTICS = ("attention2d", "ring", "usp", "double_ring")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped, out of range or inconsistent."""


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          gt: float | None = None, lt: float | None = None) -> Any:
    """A config field with a one-line description and optional bounds (min/max inclusive, gt/lt strict)."""
    bounds = {k: v for k, v in dict(min=min, max=max, gt=gt, lt=lt).items() if v is not None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=dict(help=help, **bounds))
    return field(default=default, metadata=dict(help=help, **bounds))


class _Checked:
    """Base of every config section: checks each field's bounds after construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            meta = f.metadata
            if "min" in meta and value < meta["min"]:
                raise ConfigError(f"{f.name}: must be >= {meta['min']}, got {value}")
            if "max" in meta and value > meta["max"]:
                raise ConfigError(f"{f.name}: must be <= {meta['max']}, got {value}")
            if "gt" in meta and value <= meta["gt"]:
                raise ConfigError(f"{f.name}: must be > {meta['gt']}, got {value}")
            if "lt" in meta and value >= meta["lt"]:
                raise ConfigError(f"{f.name}: must be < {meta['lt']}, got {value}")


# ----------------------------------------------------------------------------------------------
# model

MixerName = Literal["attention", "long_conv", "gated_conv"]


@dataclass(frozen=True)
class LongConvConfig(_Checked):
    """The long-convolution layer of "Simple Hardware-Efficient Long Convolutions" (Fu et al. 2023)."""

    squash_lambda: float = param(0.0, "squash regulariser: soft-threshold kernel weights by this λ (0 = off)", min=0)
    smooth_width: int = param(1, "smooth regulariser: average-pool width over the kernel (1 = off)", min=1)
    kernel_dropout: float = param(0.0, "dropout on the kernel weights during training", min=0, lt=1)
    learned_butterfly: bool = param(
        False, "learn the Monarch factors of the convolution's DFT, initialised to the exact DFT "
        "(runs the Monarch matmuls as XLA ops; not with a sequence-sharded mesh)")
    short_conv_width: int = param(3, "gated_conv only: width of the short depthwise convolution (causal in LMs, centred in classifiers)", min=1)
    kernel_len: int | None = param(
        None, "taps of each long-convolution kernel (None = data.seq_len): the kernels are [channels, kernel_len] "
        "parameters, so at long context a shorter kernel is what keeps them (and their optimizer state) small",
        min=1)


@dataclass(frozen=True)
class ModelConfig(_Checked):
    """The network. Its head (LM or classifier) and vocabulary come from the data task."""

    mixer: Literal["attention", "long_conv", "gated_conv", "hybrid"] = param(
        "long_conv", "sequence mixer of every layer; hybrid = cycle through hybrid_pattern")
    hybrid_pattern: tuple[MixerName, ...] = param(
        ("gated_conv", "attention"), "mixer of layer i is hybrid_pattern[i % len] (mixer=hybrid only)")
    d_model: int = param(128, "width of the residual stream", min=1)
    num_layers: int = param(2, "number of residual blocks (mixer + MLP)", min=1)
    num_heads: int = param(4, "attention heads", min=1)
    num_kv_heads: int | None = param(None, "key/value heads for GQA/MQA (None = num_heads)", min=1)
    mlp_hidden: int | None = param(None, "SwiGLU hidden width (None = 8/3·d_model rounded up to 64)", min=1)
    dropout: float = param(0.0, "dropout on residual branches", min=0, lt=1)
    rope_theta: float = param(10000.0, "rotary position embedding base", gt=0)
    attention_parallel: Literal["attention2d", "ring", "ulysses", "allgather_kv", "usp", "double_ring", "auto",
                                "none"] = param(
        "attention2d", "sequence-parallel attention strategy when mesh.seq_q × mesh.seq_kv > 1 (auto = the "
        "strategy and grid of mesh.seq_q × mesh.seq_kv devices the cost model predicts fastest, see "
        "`longseq plan`; none = let XLA partition it)")
    attention_keep_gathered: bool = param(
        False, "attention2d (also when auto picks it): keep the gathered query and key/value blocks for the "
        "backward pass instead of gathering them again: one all-gather of each fewer per step, for K/V memory "
        "O(seq/mesh.seq_kv) per layer instead of O(seq/devices)")
    attention_window: int | None = param(
        None, "sliding-window attention: a query sees keys fewer than this many positions away (None = all)",
        min=1)
    tie_embeddings: bool = param(True, "LM head shares the input embedding matrix")
    scan_layers: bool = param(
        False, "run the layers as one lax.scan over repeats of the mixer pattern (mixer, or hybrid_pattern): "
        "compiles one repeat instead of every layer, same numerics (the 24-layer 370M LM's step: ~10 s "
        "against ~21 s on an H200, for a 6-16% slower step); num_layers must be a multiple of the "
        "pattern's length")
    compute_dtype: Literal["float32", "bfloat16"] = param(
        "float32", "dtype of activations and matmuls (parameters stay float32)")
    long_conv: LongConvConfig = param(LongConvConfig(), "long_conv and gated_conv layer options")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixer == "hybrid" and not self.hybrid_pattern:
            raise ConfigError("hybrid_pattern: must name at least one mixer when mixer=hybrid")
        if self.scan_layers and self.num_layers % len(self.layer_pattern()):
            raise ConfigError(f"scan_layers: num_layers={self.num_layers} is not a multiple of the "
                              f"{len(self.layer_pattern())} layers of hybrid_pattern, which the scan repeats")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model: {self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % kv_heads:
            raise ConfigError(f"num_kv_heads: num_heads={self.num_heads} is not divisible by num_kv_heads={kv_heads}")
        if "attention" in self.layer_mixers() and (self.d_model // self.num_heads) % 2:
            raise ConfigError(f"d_model: head_dim = d_model/num_heads = {self.d_model // self.num_heads} "
                              "must be even for rotary embeddings")

    def layer_pattern(self) -> tuple[str, ...]:
        """The mixers of one repeat of the layer pattern: (mixer,), or hybrid_pattern."""
        return tuple(self.hybrid_pattern) if self.mixer == "hybrid" else (self.mixer,)

    def layer_mixers(self) -> tuple[str, ...]:
        """The mixer of each layer, resolving `hybrid` through the pattern."""
        if self.mixer != "hybrid":
            return (self.mixer,) * self.num_layers
        return tuple(self.hybrid_pattern[i % len(self.hybrid_pattern)] for i in range(self.num_layers))


# ----------------------------------------------------------------------------------------------
# data

@dataclass(frozen=True)
class MQARConfig(_Checked):
    """Multi-query associative recall (Zoology): key-value pairs, then queries of some of the keys."""

    vocab_size: int = param(64, "tokens, including pad=0; keys and values use disjoint halves", min=8)
    num_kv_pairs: int = param(8, "key-value pairs per sequence (each key is queried once)", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ConfigError(f"vocab_size: {self.vocab_size} leaves {self.vocab_size // 2 - 1} distinct keys, fewer "
                              f"than num_kv_pairs={self.num_kv_pairs}; it needs >= {2 * (self.num_kv_pairs + 1)}")

    def min_seq_len(self) -> int:
        return 4 * self.num_kv_pairs


@dataclass(frozen=True)
class InductionHeadsConfig(_Checked):
    """Induction heads: after `trigger x ... trigger`, predict `x`."""

    vocab_size: int = param(16, "tokens, including pad=0 and the trigger token", min=4)

    def min_seq_len(self) -> int:
        return 4


@dataclass(frozen=True)
class SelectiveCopyingConfig(_Checked):
    """Selective copying (Mamba): copy the data tokens scattered among noise, in order, after the markers."""

    vocab_size: int = param(16, "data tokens + pad=0, noise and copy-marker tokens", min=4)
    num_tokens: int = param(16, "data tokens to memorise and copy", min=1)

    def min_seq_len(self) -> int:
        return 2 * self.num_tokens + 1


@dataclass(frozen=True)
class ListOpsConfig(_Checked):
    """LRA ListOps: evaluate nested MAX/MIN/MED/SM expressions over digits; 10 classes."""

    max_depth: int = param(10, "deepest operator nesting (LRA's generator flag max_depth=10 is 9 here)", min=1)
    max_args: int = param(10, "most arguments of one operator", min=2)
    min_length: int = param(0, "shortest expression in tokens (0 = seq_len // 4)", min=0)

    def min_seq_len(self) -> int:
        return max(8, self.min_length)


@dataclass(frozen=True)
class TextConfig(_Checked):
    """Byte-level language modelling on text every Python install ships (the stdlib's help topics)."""

    eval_fraction: float = param(0.05, "share of the documents held out for evaluation", gt=0, lt=1)
    tokenizer: Literal["bytes", "bpe"] = param(
        "bytes", "bytes = one token per byte (vocabulary 256); bpe = byte-level BPE trained on the train split "
        "with the `tokenizers` library and kept in the run directory (tokenizer.json)")
    vocab_size: int = param(4096, "tokenizer=bpe: the vocabulary to train (the corpus may merge into fewer)",
                            min=257)

    def min_seq_len(self) -> int:
        return 2


TaskName = Literal["mqar", "induction_heads", "selective_copying", "listops", "text"]


@dataclass(frozen=True)
class DataConfig(_Checked):
    """Which task, how long, how many; each task's own options live in its sub-section."""

    task: TaskName = param("mqar", "the task the model is trained and evaluated on")
    seq_len: int = param(256, "tokens per example", min=1)
    batch_size: int = param(32, "examples per training step (global, over all devices)", min=1)
    seed: int = param(0, "seed of the data generators (train and eval streams are disjoint)", min=0, max=2**31 - 2)
    eval_batches: int = param(8, "batches in the fixed evaluation set", min=1)
    mqar: MQARConfig = param(MQARConfig(), "task=mqar options")
    induction_heads: InductionHeadsConfig = param(InductionHeadsConfig(), "task=induction_heads options")
    selective_copying: SelectiveCopyingConfig = param(SelectiveCopyingConfig(), "task=selective_copying options")
    listops: ListOpsConfig = param(ListOpsConfig(), "task=listops options")
    text: TextConfig = param(TextConfig(), "task=text options")

    def __post_init__(self) -> None:
        super().__post_init__()
        needed = self.task_options().min_seq_len()
        if self.seq_len < needed:
            raise ConfigError(f"seq_len: {self.seq_len} is too short for task={self.task} with its options; "
                              f"it needs at least {needed}")

    def task_options(self) -> Any:
        """The sub-section of the selected task (e.g. `self.mqar` when task=mqar)."""
        return getattr(self, self.task)


# ----------------------------------------------------------------------------------------------
# optimisation, training, devices, kernels

@dataclass(frozen=True)
class OptimConfig(_Checked):
    """AdamW with linear warmup and cosine decay; long-conv kernels form their own parameter group."""

    lr: float = param(1e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of the peak", min=0, max=1)
    warmup_steps: int = param(100, "linear warmup steps", min=0)
    weight_decay: float = param(0.1, "decoupled weight decay on matrices (not on norms, biases)", min=0)
    b1: float = param(0.9, "Adam β1", min=0, lt=1)
    b2: float = param(0.98, "Adam β2", min=0, lt=1)
    eps: float = param(1e-8, "Adam ε", gt=0)
    grad_clip: float = param(1.0, "clip the global gradient norm to this (0 = off)", min=0)
    kernel_lr: float | None = param(None, "learning rate of long-conv kernels (None = lr)", gt=0)
    kernel_weight_decay: float = param(0.0, "weight decay of long-conv kernels", min=0)


# Activations the layers tag for rematerialisation policies (`longseq.layers.remat`).
RematPolicy = Literal["none", "full", "save_dots", "save_named", "offload"]
ActivationName = Literal["block_input", "attention_qkv", "attention_out", "long_conv_out", "mlp_hidden"]


@dataclass(frozen=True)
class TrainConfig(_Checked):
    """The training loop, its run directory and its bookkeeping."""

    steps: int = param(1000, "optimizer steps in the whole run", min=1)
    seed: int = param(0, "seed of parameter initialisation and dropout", min=0, max=2**31 - 2)
    eval_every: int = param(200, "evaluate every this many steps (and at the end)", min=1)
    log_every: int = param(10, "write training metrics every this many steps (and at each checkpoint)", min=1)
    checkpoint_every: int = param(200, "save a checkpoint every this many steps (and at the end)", min=1)
    keep_checkpoints: int = param(2, "most recent checkpoints kept on disk", min=1)
    run_dir: str = param("runs", "parent folder of run directories")
    name: str | None = param(None, "run name: runs/<name>/ (None = the config file's name)")
    progress: bool = param(True, "show a progress bar")
    remat: RematPolicy = param(
        "none", "what each residual block keeps for the backward pass: none = all activations; full = only "
        "its input (the block is recomputed); save_dots = the projections' outputs; save_named = the "
        "activations in remat_save; offload = those, in pinned host memory")
    remat_save: tuple[ActivationName, ...] = param(
        (), "the tagged activations remat=save_named or offload keeps (block_input, attention_qkv, "
        "attention_out, long_conv_out, mlp_hidden); offload of block_input moves the residual stream to the host")
    loss_chunk: int | None = param(
        None, "LM tasks: compute the loss this many positions of each sequence at a time, so the [batch, seq, "
        "vocab] logits never exist (must divide data.seq_len; None = all at once)", min=1)
    mlp_chunk: int | None = param(
        None, "run each block's MLP this many positions at a time, each block of positions recomputed in the "
        "backward pass, so the [batch, seq, mlp_hidden] activations never exist whole (Mini-Sequence "
        "Transformer; must divide data.seq_len; None or ≥ data.seq_len = all at once)", min=1)
    z_loss: float = param(0.0, "LM tasks: add this × log(Z)² per token to the objective (PaLM's z-loss; the "
                          "reported loss stays the cross-entropy)", min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remat in ("save_named", "offload") and not self.remat_save:
            raise ConfigError(f"remat_save: remat={self.remat} keeps the activations it names; name at least one "
                              "of block_input, attention_qkv, attention_out, long_conv_out, mlp_hidden (or use remat=full)")
        if self.remat_save and self.remat not in ("save_named", "offload"):
            raise ConfigError(f"remat_save: only remat=save_named or offload reads it (remat is {self.remat!r})")
        if self.mlp_chunk is not None and "mlp_hidden" in self.remat_save:
            raise ConfigError("remat_save: mlp_hidden cannot be kept with train.mlp_chunk, which recomputes the MLP "
                              "block by block; drop one of them")
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name
                                      or "\\" in self.name):
            raise ConfigError(f"name: {self.name!r} must be a plain directory name (no '/', not '.' or '..')")


@dataclass(frozen=True)
class MeshConfig(_Checked):
    """Device mesh: data × fsdp × seq_q × seq_kv. The batch splits over data × fsdp; parameters,
    gradients and optimizer state split over `fsdp` (ZeRO-3 / FSDP: each weight is gathered where a layer
    uses it); the sequence splits over the seq_q × seq_kv grid (row-major), where `model.attention_parallel`
    runs attention: attention2d's query × key/value grid; usp's ring (seq_q) × Ulysses (seq_kv) degrees;
    double_ring's outer ring (seq_q, e.g. across nodes) × inner ring (seq_kv, e.g. within a node). Put
    seq_kv within a node."""

    data: int = param(-1, "devices along the data-parallel axis (-1 = all devices left by the other axes)", min=-1)
    fsdp: int = param(1, "devices that split the parameters, gradients and optimizer state (and the batch, "
                      "as data does): memory per device for them falls by this factor", min=1)
    seq_q: int = param(1, "sequence-parallel devices along the query axis of the attention grid", min=1)
    seq_kv: int = param(1, "sequence-parallel devices along the key/value axis of the attention grid", min=1)
    node_size: int | None = param(
        None, "devices per node, for the cost model of attention_parallel=auto (None = the device kind's preset)",
        min=1)
    intra_node_gbps: float | None = param(
        None, "GB/s one device sends one way inside a node, for the cost model (None = the device kind's "
        "preset; `longseq bench links` measures it)", gt=0)
    inter_node_gbps: float | None = param(
        None, "GB/s one device sends one way across nodes, for the cost model (None = the device kind's preset)",
        gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data == 0:
            raise ConfigError("data: must be a positive device count or -1 (all devices), got 0")

    @property
    def seq_devices(self) -> int:
        return self.seq_q * self.seq_kv


@dataclass(frozen=True)
class FlashAttentionConfig(_Checked):
    """Tiles and pipelining of the Pallas flash-attention kernel (impl=pallas); defaults tuned on H100.

    Every block is a power of two >= 16, given for bf16 with head_dim 128; the kernel divides them
    for wider rows (float32, head_dim 256) and shortens them for short sequences.
    """

    block_q: int = param(128, "forward: queries per program", min=16)
    block_k: int = param(128, "forward: keys per inner-loop step", min=16)
    block_q_dkv: int = param(64, "backward dK/dV: queries per inner-loop step", min=16)
    block_k_dkv: int = param(128, "backward dK/dV: keys per program", min=16)
    block_q_dq: int = param(128, "backward dQ: queries per program", min=16)
    block_k_dq: int = param(64, "backward dQ: keys per inner-loop step", min=16)
    num_warps: int = param(8, "forward: warps per program (GPU)", min=1)
    num_stages: int = param(3, "forward: software-pipelining depth of the key loop (GPU)", min=1)
    num_warps_bwd: int = param(8, "backward: warps per program (GPU)", min=1)
    num_stages_bwd: int = param(3, "backward: software-pipelining depth (GPU)", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("block") and value & (value - 1):
                raise ConfigError(f"{f.name}: must be a power of two, got {value}")
            if f.name.startswith("num_warps") and value & (value - 1):
                raise ConfigError(f"{f.name}: must be a power of two, got {value}")


@dataclass(frozen=True)
class KernelsConfig(_Checked):
    """Which implementation runs each op (`auto` = the fastest correct one for the platform)."""

    attention: Literal["auto", "pallas", "pallas_mosaic_gpu", "reference", "xla", "cudnn"] = param(
        "auto", "implementation of longseq.ops.attention (pallas_mosaic_gpu: the Hopper kernels, bfloat16 and "
                "head_dim 64 or 128)")
    long_conv: Literal["auto", "fft", "monarch", "direct"] = param(
        "auto", "implementation of longseq.ops.long_conv (auto: the Monarch kernels where they were measured faster "
                "on a GPU, else fft; monarch: DFT as matmuls, the fastest Pallas kernel that applies)")
    flash_attention: FlashAttentionConfig = param(FlashAttentionConfig(), "tiling of the Pallas attention kernel")


@dataclass(frozen=True)
class Config(_Checked):
    """A whole run."""

    model: ModelConfig = param(ModelConfig(), "the network")
    data: DataConfig = param(DataConfig(), "the task and batches")
    optim: OptimConfig = param(OptimConfig(), "optimizer and schedule")
    train: TrainConfig = param(TrainConfig(), "training loop, run directory, checkpoints")
    mesh: MeshConfig = param(MeshConfig(), "device mesh")
    kernels: KernelsConfig = param(KernelsConfig(), "op implementations")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.seq_len % self.mesh.seq_devices:
            raise ConfigError(f"data.seq_len: {self.data.seq_len} is not divisible by the "
                              f"mesh.seq_q × mesh.seq_kv = {self.mesh.seq_devices} sequence devices")
        if ("attention" in self.model.layer_mixers() and self.mesh.seq_devices > 1
                and self.model.attention_parallel == "ulysses"
                and self.model.num_heads % self.mesh.seq_devices):
            raise ConfigError(f"model.attention_parallel: ulysses needs num_heads={self.model.num_heads} "
                              f"divisible by the {self.mesh.seq_devices} sequence devices")
        if ("attention" in self.model.layer_mixers() and self.mesh.seq_devices > 1
                and self.model.attention_parallel == "usp" and self.model.num_heads % self.mesh.seq_kv):
            raise ConfigError(f"model.attention_parallel: usp runs Ulysses over mesh.seq_kv={self.mesh.seq_kv} "
                              f"devices, which needs num_heads={self.model.num_heads} divisible by {self.mesh.seq_kv}")
        if ("attention" in self.model.layer_mixers() and self.mesh.seq_devices > 1
                and self.model.attention_parallel in BACKWARD_FROM_STATISTICS
                and self.kernels.attention == "xla"):
            raise ConfigError(f"kernels.attention: attention_parallel={self.model.attention_parallel} runs each "
                              "block's backward from the merged statistics, which 'xla' cannot; use 'auto', "
                              "'cudnn', 'pallas' or 'reference'")
        if "attention" in self.model.layer_mixers() and self.kernels.attention == "pallas_mosaic_gpu":
            head_dim = self.model.d_model // self.model.num_heads
            if self.model.compute_dtype != "bfloat16" or head_dim not in (64, 128):
                raise ConfigError(f"kernels.attention: pallas_mosaic_gpu takes model.compute_dtype bfloat16 and "
                                  f"head_dim (d_model / num_heads) 64 or 128, got {self.model.compute_dtype} and "
                                  f"{head_dim}")
        if self.model.attention_keep_gathered and self.model.attention_parallel not in ("attention2d", "auto"):
            raise ConfigError("model.attention_keep_gathered: only attention2d gathers blocks it could keep "
                              f"(attention_parallel is {self.model.attention_parallel!r}); set it false or use "
                              "attention2d or auto")
        convolves = {"long_conv", "gated_conv"} & set(self.model.layer_mixers())
        kernel_len = self.model.long_conv.kernel_len
        if convolves and kernel_len is not None and kernel_len > self.data.seq_len:
            raise ConfigError(f"model.long_conv.kernel_len: {kernel_len} is longer than data.seq_len="
                              f"{self.data.seq_len}; taps past the sequence would never be used")
        if convolves and kernel_len is not None and self.model.long_conv.learned_butterfly:
            raise ConfigError("model.long_conv.kernel_len: the learned butterfly's factors are those of the "
                              "sequence's own length; leave kernel_len unset with learned_butterfly")
        if convolves and self.model.long_conv.learned_butterfly and self.mesh.seq_devices > 1:
            raise ConfigError("model.long_conv.learned_butterfly: not supported with a sequence-sharded mesh "
                              f"(mesh.seq_q × mesh.seq_kv = {self.mesh.seq_devices})")
        if convolves and self.model.d_model % self.mesh.seq_devices:
            raise ConfigError(f"model.d_model: {self.model.d_model} is not divisible by the "
                              f"{self.mesh.seq_devices} sequence devices; the sequence-parallel long "
                              "convolution splits channels over them")
        if self.train.loss_chunk is not None or self.train.z_loss:
            from longseq.data import TASKS  # the data package reads this module: import it late

            if TASKS[self.data.task].kind != "lm":
                key = "train.loss_chunk" if self.train.loss_chunk is not None else "train.z_loss"
                raise ConfigError(f"{key}: applies to language-modelling tasks; data.task={self.data.task} "
                                  "is a classification task")
        if self.train.loss_chunk is not None and self.data.seq_len % self.train.loss_chunk:
            raise ConfigError(f"train.loss_chunk: {self.train.loss_chunk} does not divide data.seq_len="
                              f"{self.data.seq_len}")
        if self.train.mlp_chunk is not None and self.train.mlp_chunk < self.data.seq_len and \
                self.data.seq_len % self.train.mlp_chunk:
            raise ConfigError(f"train.mlp_chunk: {self.train.mlp_chunk} does not divide data.seq_len="
                              f"{self.data.seq_len}")
        if self.train.mlp_chunk is not None and self.train.mlp_chunk % self.mesh.seq_devices:
            raise ConfigError(f"train.mlp_chunk: {self.train.mlp_chunk} is not a multiple of the "
                              f"{self.mesh.seq_devices} sequence devices (each block of positions stays spread "
                              "over them)")
        if self.mesh.data > 0 and self.data.batch_size % (self.mesh.data * self.mesh.fsdp):
            raise ConfigError(f"data.batch_size: {self.data.batch_size} is not divisible by the "
                              f"mesh.data × mesh.fsdp = {self.mesh.data} × {self.mesh.fsdp} batch devices")
        elif self.data.batch_size % self.mesh.fsdp:
            raise ConfigError(f"data.batch_size: {self.data.batch_size} is not divisible by mesh.fsdp="
                              f"{self.mesh.fsdp} (the batch splits over the fsdp devices too)")


# ----------------------------------------------------------------------------------------------
# building a Config from plain data, YAML files and overrides

def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation and return it in the field's Python type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}{hint}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {_describe(value)}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")  # a bug in this file, not in the config


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build config section `cls` from a (possibly partial) nested dict, checking every key and value."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        message = str(error)
        if prefix and not message.startswith(prefix):
            message = prefix + message
        raise ConfigError(message) from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML- and JSON-ready)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, resolving `extends: other.yaml` (relative to the file) recursively."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"extends: cycle through {' -> '.join(p.name for p in (*chain, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"extends: expected a file name, got {_describe(base)}")
    return _merge(_read_yaml(path.parent / base, (*chain, path)), data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins, mappings merge key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`model.d_model=256` -> {"model": {"d_model": 256}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value, e.g. train.steps=500")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a YAML file (with its `extends:` chain) plus dotted overrides into a checked `Config`."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        data = _merge(data, parse_override(text))
    return from_dict(Config, data)


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: the documentation of the config keys."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            rows += describe_fields(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, repr(list(default) if isinstance(default, tuple) else default),
                         f.metadata.get("help", "")))
    return rows
