"""Where one train step of a config spends its GPU time: attention, matmuls, long conv, the rest, the host.

Compiles the step `longseq bench train` times (`longseq.bench.train.prepare_step`), runs it a few times,
traces one under `jax.profiler` and sums the GPU kernel time by kind: attention kernels (cuDNN / Pallas),
matmul kernels (cuBLAS / cuBLASLt / CUTLASS GEMMs), long-convolution kernels (cuFFT / the Monarch kernels),
and the rest (XLA fusions), split by the JAX operation each fusion came from (its `op_name`): the forward
pass's norms, activations, casts and loss ("jvp"), the backward pass's ("transpose", rematerialisation
included), and the update (AdamW, the gradient norm, the finite check: neither). "outside the GPU span" is
the untraced wall time per step less the traced step's span from its first kernel to its last (the host's
dispatch and the result's return; the traced step can run a few ms slower, so it can come out negative).
It prints the 20 longest of the rest by name, and one row of the breakdown in milliseconds.

    PYTHONPATH=src python3 experiments/end_to_end/profile_train.py configs/bench_lm_370m.yaml [overrides] [--out DIR]

With `--out DIR` it also writes DIR/kernels.json (every GPU kernel of the traced step: name, kind, total ns,
launches; and the breakdown) and DIR/step.hlo.txt (the compiled step's optimized HLO, where a fusion's kernel
name is its instruction's name), for reading offline which fusions take the time.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax

from longseq.bench.train import prepare_step
from longseq.config import load_config

ATTENTION = ("cudnn", "fmha", "flash", "attention", "mha")
MATMUL = ("gemm", "cublas", "cutlass", "nvjet", "xmma", "sm90_", "sm100_", "matmul", "dot")
LONG_CONV = ("fft", "monarch", "long_conv",
             "real_complex", "scal_kernel")  # cuFFT's real-to-complex steps; XLA's inverse FFT scales by cuBLAS


def kind(name: str) -> str:
    lowered = name.lower()
    if any(word in lowered for word in ATTENTION):
        return "attention"
    if any(word in lowered for word in LONG_CONV):
        return "long conv"
    if any(word in lowered for word in MATMUL):
        return "matmul"
    if "memcpy" in lowered or "memset" in lowered:
        return "copy"
    return "other"


def fusion_phases(hlo_text: str) -> dict[str, str]:
    """Kernel name of each XLA instruction (its name with "." and "-" as "_") -> "forward", "backward" or
    "update", read from the JAX operation in its metadata."""
    phases = {}
    for name, op_name in re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text):
        phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "update"
        phases.setdefault(name.replace(".", "_").replace("-", "_"), phase)
    return phases


def main(argv: list[str]) -> None:
    out = None
    if "--out" in argv:
        at = argv.index("--out")
        out, argv = argv[at + 1], argv[:at] + argv[at + 2:]
        os.makedirs(out, exist_ok=True)
    config = load_config(argv[0], argv[1:])
    step = prepare_step(config)
    for _ in range(3):
        jax.block_until_ready(step.call())
    start = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(step.call())
    wall_ms = (time.perf_counter() - start) / 5 * 1e3
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            jax.block_until_ready(step.call())
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    print(f"{argv}: {wall_ms:.2f} ms per step untraced; model {step.flops['flops'] / wall_ms / 1e9:.0f} TFLOP/s")
    hlo = step.compiled.as_text()
    phases = fusion_phases(hlo)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        totals, others, first, last = collections.Counter(), collections.Counter(), float("inf"), 0.0
        every, launches, breakdown = collections.Counter(), collections.Counter(), collections.Counter()
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                what = kind(event.name)
                totals[what] += event.duration_ns
                part = f"other, {phases.get(event.name, 'unnamed')}" if what == "other" else what
                breakdown[part] += event.duration_ns / 1e6
                every[event.name] += event.duration_ns
                launches[event.name] += 1
                first, last = min(first, event.start_ns), max(last, event.start_ns + event.duration_ns)
                if what == "other":
                    others[event.name[:100]] += event.duration_ns
        if not totals:
            continue
        busy = sum(totals.values())
        print(f"  {plane.name}: span {(last - first) / 1e6:.2f} ms, kernels {busy / 1e6:.2f} ms: "
              + ", ".join(f"{name} {ns / 1e6:.2f} ms ({100 * ns / busy:.0f}%)" for name, ns in totals.most_common()))
        print(f"  attention model FLOPs at {step.flops['attention_flops'] / max(totals['attention'], 1):.0f} GFLOP/s "
              f"of attention kernel time; matmul model FLOPs at "
              f"{step.flops['matmul_flops'] / max(totals['matmul'], 1):.0f} GFLOP/s of matmul kernel time")
        for name, ns in others.most_common(20):
            print(f"      {ns / 1e6:7.3f} ms  {name}")
        breakdown = {part: round(ms, 2) for part, ms in breakdown.most_common()}
        breakdown["outside the GPU span"] = round(wall_ms - (last - first) / 1e6, 2)
        print("  breakdown (ms): " + json.dumps(breakdown))
        if out:
            rows = [{"name": name, "kind": kind(name), "ns": ns, "launches": launches[name]}
                    for name, ns in every.most_common()]
            with open(os.path.join(out, "kernels.json"), "w") as f:
                json.dump({"argv": argv, "wall_ms": wall_ms, "span_ms": (last - first) / 1e6,
                           "breakdown": breakdown, "kernels": rows}, f, indent=0)
    if out:
        with open(os.path.join(out, "step.hlo.txt"), "w") as f:
            f.write(hlo)


if __name__ == "__main__":
    main(sys.argv[1:])
