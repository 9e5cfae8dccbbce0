"""End-to-end training benchmark: `longseq bench train CONFIG [overrides]`.

Builds the run a config describes (model, optimizer, mesh, sequence-parallel strategy: the trainer's own
`Steps`), then times its jitted train step on one fixed batch of the config's task (the data pipeline is not
timed) and reports, for the steady state:

    step_ms          median of `iters` timed steps after `warmup` untimed ones (each waited for)
    tokens_per_s     batch_size × seq_len / step time
    model_tflops     model FLOPs / step time (all devices of the mesh together), counted as MaxText and Megatron do:
                       6 × matmul parameters × tokens            (every Linear kernel, and the LM head; the
                                                                  embedding lookup and convolutions are not
                                                                  matmuls; recomputation is not counted)
                     + 6 × attention layers × seq_len × heads·head_dim × tokens   (causal attention: half of
                                                                  the 12·L·T·d of full attention)
    model_tflops_per_device  model_tflops / the mesh's devices
    mfu              model_tflops_per_device / the chip's datasheet dense bf16 peak (989 TFLOP/s for H100 and
                     H200 SXM; None on chips without a known peak)
    matmul_fraction  model_tflops_per_device / a bf16 8192² matmul's TFLOP/s measured in the same process (the
                     ceiling XLA reaches on this chip)
    peak_memory_gib  the device's peak bytes in use (GPU allocator statistics, the process's peak so far: one
                     configuration per process, as the CLI runs it; None on CPU), and
    compile_s        seconds to trace, lower and compile the step (XLA's autotuning and, on GPUs, cuDNN's graph
                     building included: the 24-layer 370M LM unrolled takes minutes on an H200, scanned seconds)
    compiled_gib     the trainer's memory report for the step (`longseq.train.memory`: XLA's arguments +
                     outputs + temporaries − aliased); a step that cannot fit the device is refused before
                     anything is allocated

One JSON row per run (`--out DIR/train.json`) and a markdown line. The anchor script
(`../shared/anchors/train_mfu_anchor.py`) runs the same shape of model written plainly in JAX; run it in the same
call for the ratio.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longseq.bench.timing import time_calls

# Dense bf16 peak FLOP/s of a chip's datasheet (without sparsity), by `device_kind` prefix.
DATASHEET_BF16_PEAK = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "TPU v5p": 459e12,
                       "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v6 lite": 918e12}


def datasheet_peak(device_kind: str) -> float | None:
    for prefix, peak in DATASHEET_BF16_PEAK.items():
        if device_kind.startswith(prefix):
            return peak
    return None


def matmul_parameters(params: Any, *, tied_head: int = 0) -> int:
    """Parameters that multiply activations in a matmul: every leaf named `kernel` of an nnx.Linear
    (the `other` group: the long-conv kernels live in the `kernel` group and are not matmuls), plus
    `tied_head` = d_model × vocab when the LM head reuses the embedding table."""
    count = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params["other"]):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [k for k in keys if isinstance(k, str) and k != "value"]
        if names and names[-1] == "kernel":
            count += int(np.prod(leaf.shape))
    return count + tied_head


def model_flops_per_step(config, params: Any, vocab_size: int | None) -> dict[str, float]:
    """The MaxText/Megatron model FLOPs of one train step (see the module docstring)."""
    model, tokens = config.model, config.data.batch_size * config.data.seq_len
    tied = model.d_model * vocab_size if (vocab_size and model.tie_embeddings) else 0
    n_matmul = matmul_parameters(params, tied_head=tied)
    attention_layers = sum(1 for mixer in model.layer_mixers() if mixer == "attention")
    head_dim = model.d_model // model.num_heads
    attention = 6 * attention_layers * config.data.seq_len * model.num_heads * head_dim * tokens
    if model.attention_window is not None:
        attention *= min(1.0, 2 * model.attention_window / config.data.seq_len)
    return {"matmul_params": n_matmul, "matmul_flops": 6.0 * n_matmul * tokens, "attention_flops": float(attention),
            "flops": 6.0 * n_matmul * tokens + attention}


def matmul_ceiling(size: int = 8192, iters: int = 10) -> float:
    """FLOP/s of a bf16 [size, size] @ [size, size] matmul with float32 accumulation, as XLA runs it."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * size ** 3 / (time_calls(matmul, a, a, iters=iters, warmup=3).median_ms * 1e-3)


class PreparedStep(NamedTuple):
    """A config's compiled train step on one fixed batch: `call()` runs one step (the state carried
    between calls, donated) and returns its metrics."""

    call: Callable[[], Any]
    compiled: Any
    flops: dict[str, float]
    num_params: int
    strategy: str
    memory: Any  # longseq.train.memory.MemoryReport
    devices: int  # of the step's mesh
    compile_s: float  # tracing, lowering and compiling the step


def prepare_step(config) -> PreparedStep:
    """Build the run `config` describes (the trainer's mesh, strategy and `Steps`) and compile its train step
    from shapes; refuse it (ConfigError) where the memory report says it cannot fit, else allocate the state."""
    from longseq import data as data_lib
    from longseq.plan import sequence_parallel_choice
    from longseq.train.trainer import Steps, _put_batch, make_mesh

    task = data_lib.make_task(config.data)
    choice = sequence_parallel_choice(config)
    mesh = make_mesh(config, choice.grid)
    steps = Steps(config, task, mesh, strategy=choice.strategy)
    example = task.batch("train", 0, config.data.batch_size)
    start = time.perf_counter()
    compiled, memory = steps.compile_train_step(mesh, example)
    compile_s = time.perf_counter() - start
    memory.check(config)
    holder = {"state": steps.init()}
    batch = _put_batch(example, mesh)
    flops = model_flops_per_step(config, steps.abstract_state["params"], getattr(task, "vocab_size", None))

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    return PreparedStep(call, compiled, flops, steps.num_params, choice.strategy, memory, mesh.size, compile_s)


def run_train_bench(config, *, iters: int = 8, warmup: int = 3, matmul_size: int = 8192) -> dict[str, Any]:
    """One row (module docstring) for `config`."""
    for name, value in (("iters", iters), ("warmup", warmup), ("matmul_size", matmul_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "warmup" else 1):
            raise ValueError(f"{name}: expected a {'non-negative' if name == 'warmup' else 'positive'} integer, "
                             f"got {value!r}")
    device = jax.devices()[0]
    ceiling = matmul_ceiling(matmul_size)
    step = prepare_step(config)
    seconds = time_calls(step.call, iters=iters, warmup=warmup).median_ms * 1e-3
    metrics = jax.device_get(step.call())
    stats = device.memory_stats() or {}
    tokens = config.data.batch_size * config.data.seq_len
    peak = datasheet_peak(device.device_kind)
    model_flops_per_s = step.flops["flops"] / seconds
    per_device = model_flops_per_s / step.devices  # MFU and the ceiling are a chip's
    return {
        "device_kind": device.device_kind, "devices": step.devices, "jax": jax.__version__,
        "mixer": config.model.mixer, "d_model": config.model.d_model, "layers": config.model.num_layers,
        "heads": config.model.num_heads, "params": step.num_params, **step.flops,
        "batch": config.data.batch_size, "seq_len": config.data.seq_len, "tokens": tokens,
        "compute_dtype": config.model.compute_dtype, "attention_kernel": config.kernels.attention,
        "attention_parallel": step.strategy if config.mesh.seq_devices > 1 else None,
        "step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds, "model_tflops": model_flops_per_s / 1e12,
        "model_tflops_per_device": per_device / 1e12,
        "mfu": None if peak is None else per_device / peak, "datasheet_peak_tflops": None if peak is None else peak / 1e12,
        "matmul_tflops": ceiling / 1e12, "matmul_fraction": per_device / ceiling,
        "peak_memory_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
        "compile_s": step.compile_s, "compiled_gib": step.memory.total / 2**30,
        "remat": config.train.remat, "loss_chunk": config.train.loss_chunk,
        "loss": float(metrics["loss_sum"]) / max(float(metrics["weight_sum"]), 1e-9),
        "iters": iters, "warmup": warmup,
    }


def format_row(row: dict[str, Any]) -> str:
    def num(value, spec):
        return "—" if value is None else format(value, spec)

    header = ("| mixer | params | batch × seq | step ms | tokens/s | model TFLOP/s | MFU | of matmul ceiling | "
              "peak GiB | compiled GiB | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    return header + (f"| {row['mixer']} | {row['params'] / 1e6:.0f}M | {row['batch']} × {row['seq_len']} | "
                     f"{row['step_ms']:.1f} | {row['tokens_per_s']:,.0f} | {row['model_tflops']:.1f} | "
                     f"{num(row['mfu'] and 100 * row['mfu'], '.1f')}% | {100 * row['matmul_fraction']:.1f}% "
                     f"({row['matmul_tflops']:.0f} TFLOP/s) | {num(row['peak_memory_gib'], '.1f')} | "
                     f"{num(row['compiled_gib'], '.1f')} | {row['compile_s']:.1f} |")


def write_row(row: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.json"
    path.write_text(json.dumps(row, indent=1) + "\n")
    return path
