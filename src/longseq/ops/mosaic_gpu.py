"""What longseq's Pallas Mosaic GPU (Hopper) kernels share: where they can run, and the interpreter that runs
them on a CPU."""

from __future__ import annotations

import jax


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), which the kernels need."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def interpret_params():
    """The Pallas GPU interpreter's parameters (a CPU run of a Mosaic GPU kernel: threads, barriers and TMA
    copies simulated). jax 0.10 keeps the class in a private module. The interpreter has no plgpu.load with
    layouts, no transposed refs, no A operand in registers and no TMA reductions, which is why the kernels take
    those paths only when compiled."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def computed_once(outputs):
    """A kernel's outputs behind an optimization barrier. Without it, XLA's dynamic-slice fusion may copy the
    kernel's custom call into a fusion that writes its result straight into a scanned model's stack of saved
    activations, while the original call still feeds the next op: the kernel then runs twice per layer (the
    Hopper attention forward did, in the 24-layer scanned LM of `configs/bench_lm_370m.yaml`: 48 forward calls
    where 24 were needed, 9% of the step)."""
    return jax.lax.optimization_barrier(outputs)
