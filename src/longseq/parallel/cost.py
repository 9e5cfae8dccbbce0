"""A cost model of the sequence-parallel attention strategies, and the choice `strategy: auto` makes.

For one attention call, forward and backward, of a problem ([batch, seq, heads | kv_heads, head_dim],
causal or not) on a Pq × Pkv grid of devices, `predict` gives per device:

  compute   the attention FLOPs of the device's share (the anchors' convention: 4·B·H·N²·D, /2
            causal, ×3.5 forward+backward; the causal strategies balance it with zigzag) at the
            chip's measured attention throughput (for allgather_kv's causal blocks, which run the
            portable kernel, at `masked_ratio` of it);
  transfers every collective the strategy issues (the bytes `longseq bench comm` reads from the
            compiled HLO: `bytes_sent` is their sum), each on the link it crosses and either exposed
            (nothing runs beside it: all-gathers, reduce-scatters, all-to-alls, zigzag swaps, a ring's
            last trip home) or pipelined (a ring step's K/V transfer runs under the step before's
            attention: the step costs the longer of the two);
  memory    the attention working set the strategy holds at once (gathered blocks, ring buffers,
            float32 accumulators);

and time = compute + exposed transfers + what the pipelined transfers do not hide. Links: the mesh is
(data, seq_q, seq_kv), row-major over devices, and a node holds `node_size` consecutive devices. A
collective over seq_kv stays inside a node when a node holds whole rows of the grid (Pkv ≤
node_size); one over seq_q, or over the flat sequence axes, stays inside when the whole grid does
(Pq·Pkv ≤ node_size); otherwise it runs at the slower inter-node bandwidth. Each transfer also pays
`latency`.

`candidates` predicts every strategy on every grid of P sequence devices, `choose` the fastest that
fits the memory budget. The model is a guide: `longseq bench parallel` measures, and docs/parallel.md
compares the two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from longseq.parallel.attention import BALANCED_IN_PLACE, STRATEGIES

FLOAT32 = 4
TWO_AXIS = ("attention2d", "usp", "double_ring")  # the strategies whose grid shape matters


@dataclasses.dataclass(frozen=True)
class System:
    """What the model needs to know about the machine.

    attention_flops: forward+backward attention FLOP/s one device reaches on whole blocks (cuDNN on
      GPUs), by the anchors' FLOP convention.
    masked_ratio: the share of that for blocks masked at traced offsets (the portable kernel).
    intra_bandwidth, inter_bandwidth: bytes/s one device sends one way, inside a node and across nodes.
    node_size: devices per node.
    memory: bytes of one device's memory.
    latency: seconds each transfer costs beside its bytes.
    """

    attention_flops: float
    intra_bandwidth: float
    inter_bandwidth: float
    node_size: int
    memory: float
    masked_ratio: float = 0.73
    latency: float = 20e-6

    def __post_init__(self) -> None:
        for name in ("attention_flops", "intra_bandwidth", "inter_bandwidth", "memory", "masked_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.node_size, int) or self.node_size < 1:
            raise ValueError(f"node_size: expected a positive integer, got {self.node_size!r}")


# Measured where a figure is given (2026-11, jax 0.11.2): cuDNN forward+backward at N ≥ 16K, bf16, head_dim
# 128 (docs/attention.md, docs/parallel.md); NVLink ppermute of 1 GiB between two H200s, 307 GB/s per
# direction (../shared/anchors/README.md). Across nodes: one 400 Gb/s InfiniBand NIC per GPU (50 GB/s),
# the DGX H100/H200 design; not measured here.
SYSTEMS = {
    "h100": System(attention_flops=550e12, intra_bandwidth=307e9, inter_bandwidth=50e9, node_size=8,
                   memory=80e9),
    "h200": System(attention_flops=555e12, intra_bandwidth=307e9, inter_bandwidth=50e9, node_size=8,
                   memory=141e9),
    # A stand-in for CPUs (tests, `longseq plan` without accelerators): the choice still follows bytes.
    "cpu": System(attention_flops=1e11, intra_bandwidth=10e9, inter_bandwidth=1e9, node_size=8, memory=16e9),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention call: q [batch, seq, heads, head_dim], k, v [batch, seq, kv_heads, head_dim].

    order: the sequence order the caller keeps (`parallel.attention`'s): in "zigzag" order the strategies
    that balance in place (`BALANCED_IN_PLACE`) swap nothing; the others are counted in natural order.
    """

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int = 2
    causal: bool = True
    order: str = "natural"

    def flops(self) -> float:
        """Forward+backward FLOPs of the whole problem, in the anchors' convention."""
        dense = 4 * self.batch * self.heads * self.seq ** 2 * self.head_dim
        return dense * (0.5 if self.causal else 1.0) * 3.5


class Transfer(NamedTuple):
    """Bytes one device sends in one collective, the mesh axes it crosses ("seq_q", "seq_kv" or
    "flat" for both), the pass it belongs to ("fwd" or "bwd"), and whether ring steps hide it: then
    `steps` transfers of this size run one per step, each beside `compute` seconds of attention."""

    bytes: float
    axis: str
    pass_: str
    steps: int = 0
    compute: float = 0.0


class Prediction(NamedTuple):
    strategy: str
    grid: tuple[int, int]
    time: float            # seconds per forward+backward call
    compute: float         # seconds of attention on the device
    communication: float   # seconds of transfers not hidden by attention
    bytes_sent: float      # per device, the sum of every collective's bytes
    memory: float          # bytes of the attention working set
    fits: bool             # memory ≤ the budget


def grids(strategy: str, devices: int) -> tuple[tuple[int, int], ...]:
    """Every Pq × Pkv = P (1×P first) for the two-axis strategies, 1×P for the others."""
    if strategy in TWO_AXIS:
        return tuple((rows, devices // rows) for rows in range(1, devices + 1) if devices % rows == 0)
    return ((1, devices),)


def unsupported(strategy: str, grid: tuple[int, int], problem: Problem) -> str | None:
    """Why the strategy cannot run this problem on this grid, or None."""
    devices = grid[0] * grid[1]
    if problem.seq % devices:
        return f"seq={problem.seq} is not divisible by the {devices} devices"
    if strategy == "ulysses" and problem.heads % devices:
        return f"ulysses needs heads={problem.heads} divisible by the {devices} devices"
    if strategy == "usp" and problem.heads % grid[1]:
        return f"usp needs heads={problem.heads} divisible by its Ulysses degree Pkv={grid[1]}"
    return None


def _zigzag_halves(devices: int) -> int:
    """Half-chunks the busiest device sends (and receives) in one zigzag swap of one array."""
    if devices < 2:
        return 0
    owner = lambda piece: piece if piece < devices else 2 * devices - 1 - piece  # noqa: E731
    return max((owner(2 * d) != d) + (owner(2 * d + 1) != d) for d in range(devices))


def transfers(strategy: str, grid: tuple[int, int], problem: Problem, system: System,
              keep_gathered: bool = False) -> list[Transfer]:
    """Every collective of one forward+backward call, per device (see the module docstring).
    keep_gathered: attention2d keeps its gathered blocks, and its backward gathers only out and dout.

    The pipelined ring steps carry the compute seconds of one step, so that `predict` can compare them;
    the bytes alone are what `longseq bench comm` counts.
    """
    rows, cols = grid
    devices = rows * cols
    n = problem.seq / devices
    s, b = problem.itemsize, problem.batch
    d, d_kv, heads = problem.heads * problem.head_dim, problem.kv_heads * problem.head_dim, problem.heads
    compute = problem.flops() / devices / system.attention_flops
    forward, backward = compute / 3.5, compute * 2.5 / 3.5
    out: list[Transfer] = []

    def exposed(nbytes, axis, pass_):
        if nbytes > 0:
            out.append(Transfer(b * nbytes, axis, pass_))

    def ring(steps, kv_width, axis, chunk):
        """K/V around a ring of `steps` devices (chunks of `chunk` rows): forward, then the backward's
        K/V again with float32 gradient sums, and the sums' last trip home in the input dtype."""
        if steps < 2:
            return
        out.append(Transfer(b * 2 * chunk * kv_width * s, axis, "fwd", steps - 1, forward / steps))
        out.append(Transfer(b * 2 * chunk * kv_width * (s + FLOAT32), axis, "bwd", steps - 1, backward / steps))
        exposed(2 * chunk * kv_width * s, axis, "bwd")

    def zigzag(forward_width, backward_width, ring_devices, chunk):
        """Half-chunk swaps into and out of zigzag order (causal only) of arrays this wide in all: the
        forward's inputs in and output back, the backward's output gradient in and input gradients back."""
        if problem.causal and ring_devices > 1 and not (problem.order == "zigzag" and strategy in BALANCED_IN_PLACE):
            halves = _zigzag_halves(ring_devices) * chunk / 2 * s
            exposed(halves * forward_width, "flat", "fwd")
            exposed(halves * backward_width, "flat", "bwd")

    if strategy == "allgather_kv":
        exposed(2 * (devices - 1) * n * d_kv * s, "flat", "fwd")   # all-gather K, V
        exposed(2 * (devices - 1) * n * d_kv * s, "flat", "bwd")   # reduce-scatter dK, dV
        zigzag(2 * d, 2 * d, devices, n)                           # q in, out back; dout in, dq back
    elif strategy == "ring":
        ring(devices, d_kv, "flat", n)
        zigzag(2 * d + 2 * d_kv, 2 * d + 2 * d_kv, devices, n)     # q, k, v, out; dout, dq, dk, dv
    elif strategy == "ulysses":
        d_kv_moved = d if problem.kv_heads % devices else d_kv
        each_way = (devices - 1) / devices * n * (2 * d + 2 * d_kv_moved) * s  # q, k, v, out
        exposed(each_way, "flat", "fwd")
        exposed(each_way, "flat", "bwd")                           # the transposed all-to-alls
    elif strategy == "attention2d":
        row = (cols - 1) * n * d * s             # one [n, d] array over the grid row (seq_kv)
        column = (rows - 1) * n * d_kv * s       # one [n, d_kv] array over the grid column (seq_q)
        lse = 2 * 2 * (cols - 1) * n * heads * FLOAT32  # the row's pmax and psum of the float32 lse
        exposed(2 * row + lse, "seq_kv", "fwd")  # q in, out scattered
        exposed(2 * column, "seq_q", "fwd")      # k, v in
        exposed((3 if keep_gathered else 4) * row, "seq_kv", "bwd")     # (q,) out, dout in, dq scattered
        exposed((2 if keep_gathered else 4) * column, "seq_q", "bwd")   # (k, v in,) dk, dv scattered
        queries, keys = (2 * d if rows > 1 else 0), (2 * d_kv if cols > 1 else 0)
        zigzag(queries + keys, queries + keys, devices, n)
    elif strategy == "usp":
        d_kv_moved = d if problem.kv_heads % cols else d_kv
        each_way = (cols - 1) / cols * n * (2 * d + 2 * d_kv_moved) * s
        exposed(each_way, "seq_kv", "fwd")
        exposed(each_way, "seq_kv", "bwd")
        ring(rows, d_kv_moved / cols, "seq_q", cols * n)   # chunks of Pkv·n rows on heads / Pkv
        width = (2 * d + 2 * d_kv_moved) / cols
        zigzag(width, width, rows, cols * n)
    elif strategy == "double_ring":
        if devices > 1:
            inner, outer = rows * (cols - 1), rows - 1   # K/V hops of each kind per pass (P − 1 in all)
            step_forward, step_backward = forward / devices, backward / devices
            if inner:
                out.append(Transfer(b * 2 * n * d_kv * s, "seq_kv", "fwd", inner, step_forward))
                out.append(Transfer(b * 2 * n * d_kv * (s + FLOAT32), "seq_kv", "bwd", inner, step_backward))
            if outer:  # one per inner round, under the whole round
                out.append(Transfer(b * 2 * n * d_kv * s, "seq_q", "fwd", outer, cols * step_forward))
                out.append(Transfer(b * 2 * n * d_kv * (s + FLOAT32), "seq_q", "bwd", outer, cols * step_backward))
            exposed(2 * n * d_kv * s, "flat", "bwd")   # the gradient sums' trip home
        zigzag(2 * d + 2 * d_kv, 2 * d + 2 * d_kv, devices, n)
    else:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return out


def bytes_sent(strategy: str, grid: tuple[int, int], problem: Problem, pass_: str = "fwd+bwd",
               keep_gathered: bool = False) -> float:
    """Bytes one device sends in one call ("fwd" or "fwd+bwd"): the figure `longseq bench comm` reads."""
    if pass_ not in ("fwd", "fwd+bwd"):
        raise ValueError(f"pass_: expected 'fwd' or 'fwd+bwd', got {pass_!r}")
    return sum(t.bytes * max(t.steps, 1) for t in transfers(strategy, grid, problem, SYSTEMS["cpu"], keep_gathered)
               if pass_ == "fwd+bwd" or t.pass_ == "fwd")


def memory(strategy: str, grid: tuple[int, int], problem: Problem, keep_gathered: bool = False) -> float:
    """Bytes of the attention working set one device holds at once (inputs and outputs of its own
    chunk included; the model's other activations not). keep_gathered (attention2d): the gathered
    blocks beyond the own chunk are also held from the forward to the backward pass."""
    rows, cols = grid
    devices = rows * cols
    n = problem.seq / devices
    s, b = problem.itemsize, problem.batch
    d, d_kv = problem.heads * problem.head_dim, problem.kv_heads * problem.head_dim
    own = n * (3 * d + 2 * d_kv) * s                       # q, k, v, out, dout
    if strategy == "allgather_kv":
        extra = 2 * problem.seq * d_kv * (s + FLOAT32)     # gathered K, V and their float32 gradients
    elif strategy == "ring":
        extra = 2 * n * d_kv * s + 4 * n * d_kv * FLOAT32 + n * d * FLOAT32  # K/V in flight, dK/dV sums, dq
    elif strategy == "ulysses":
        extra = n * (3 * d + 2 * d_kv) * s                 # the head-sharded copies
    elif strategy == "attention2d":
        extra = cols * n * 3 * d * s + rows * n * 2 * d_kv * s + cols * n * d * FLOAT32 + rows * n * 2 * d_kv * FLOAT32
        if keep_gathered:
            extra += (cols - 1) * n * d * s + (rows - 1) * n * 2 * d_kv * s
    elif strategy == "usp":
        extra = n * (3 * d + 2 * d_kv) * s + (2 * n * d_kv * s + 4 * n * d_kv * FLOAT32 + n * d * FLOAT32)
    elif strategy == "double_ring":
        extra = 4 * n * d_kv * s + 4 * n * d_kv * FLOAT32 + n * d * FLOAT32  # the next outer block too
    else:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return b * (own + extra)


def _link(axis: str, grid: tuple[int, int], system: System) -> float:
    rows, cols = grid
    inside = cols <= system.node_size if axis == "seq_kv" else rows * cols <= system.node_size
    return system.intra_bandwidth if inside else system.inter_bandwidth


def predict(strategy: str, grid: tuple[int, int], problem: Problem, system: System,
            memory_budget: float | None = None, keep_gathered: bool = False) -> Prediction:
    """The model's forward+backward time of one call, and what goes into it (module docstring).

    memory_budget: bytes the attention working set may take (default a quarter of the device's memory:
    the rest holds parameters, optimizer state and the other layers' activations).
    keep_gathered: attention2d keeps its gathered blocks for the backward (ignored by the others).
    """
    keep_gathered = keep_gathered and strategy == "attention2d"
    devices = grid[0] * grid[1]
    compute = problem.flops() / devices / system.attention_flops
    if strategy == "allgather_kv" and problem.causal and devices > 1:
        compute /= system.masked_ratio  # its causal pieces are cut at traced offsets: the portable kernel
    communication = 0.0
    for t in transfers(strategy, grid, problem, system, keep_gathered):
        seconds = t.bytes / _link(t.axis, grid, system) + system.latency
        if t.steps:  # each step costs the longer of its transfer and the attention it runs beside
            communication += t.steps * max(0.0, seconds - t.compute)
        else:
            communication += seconds
    budget = system.memory / 4 if memory_budget is None else memory_budget
    used = memory(strategy, grid, problem, keep_gathered)
    return Prediction(strategy, tuple(grid), compute + communication, compute, communication,
                      bytes_sent(strategy, grid, problem, keep_gathered=keep_gathered), used, used <= budget)


def candidates(devices: int, problem: Problem, system: System, strategies=STRATEGIES,
               memory_budget: float | None = None, keep_gathered: bool = False) -> list[Prediction]:
    """Every strategy that can run the problem, on each of its grids of `devices`, fastest first."""
    found = [predict(strategy, grid, problem, system, memory_budget, keep_gathered)
             for strategy in strategies for grid in grids(strategy, devices)
             if unsupported(strategy, grid, problem) is None]
    return sorted(found, key=lambda p: (not p.fits, p.time))


def choose(devices: int, problem: Problem, system: System, strategies=STRATEGIES,
           memory_budget: float | None = None, keep_gathered: bool = False) -> Prediction:
    """The fastest prediction that fits the memory budget (`candidates`' first); a ValueError names
    what does not fit when nothing does."""
    found = candidates(devices, problem, system, strategies, memory_budget, keep_gathered)
    if not found:
        raise ValueError(f"no strategy runs seq={problem.seq}, heads={problem.heads} on {devices} devices")
    if not found[0].fits:
        best = min(found, key=lambda p: p.memory)
        raise ValueError(f"memory: no strategy fits; the smallest working set is {best.strategy} "
                         f"{best.grid[0]}x{best.grid[1]} with {best.memory / 2**30:.1f} GiB per device")
    return found[0]


def rank_correlation(xs, ys) -> float:
    """Spearman's rank correlation of two equally long sequences (ties share their mean rank)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"expected two sequences of the same length ≥ 2, got {len(xs)} and {len(ys)}")
    rx, ry = ranks(list(xs)), ranks(list(ys))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else 0.0
