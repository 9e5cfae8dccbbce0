"""The cost model of the sequence-parallel strategies (longseq.parallel.cost) and `longseq plan`.

The bytes are checked against the compiled HLO in tests/bench/test_bench_comm.py; here, the model's
own arithmetic and the choices it makes.
"""

import dataclasses
import math

import pytest

from longseq.cli import main
from longseq.config import load_config
from longseq.parallel import cost
from longseq.plan import attention_problem, sequence_parallel_choice, system_preset

H200 = cost.SYSTEMS["h200"]


def problem(seq=65536, heads=16, kv_heads=16, causal=True, batch=1):
    return cost.Problem(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=128, itemsize=2, causal=causal)


def test_ring_bytes_and_square_attention2d_over_ring():
    N, d = 65536, 16 * 128
    ring = cost.bytes_sent("ring", (1, 64), problem(N, causal=False), "fwd")
    assert ring == pytest.approx(2 * 63 / 64 * N * d * 2)
    both = cost.bytes_sent("ring", (1, 64), problem(N, causal=False))
    assert both == pytest.approx(2 * ring + 2 * 63 / 64 * N * d * 4 + 2 / 64 * N * d * 2)
    square = cost.bytes_sent("attention2d", (8, 8), problem(N, causal=False), "fwd")
    assert 2 / (8 + 1) < square / ring < 2 / 8  # 2/(√P+1) plus the lse all-reduces
    # double_ring moves ring's bytes, whatever the split; usp 1×P is ulysses, P×1 is ring.
    for grid in cost.grids("double_ring", 64):
        assert cost.bytes_sent("double_ring", grid, problem(N, causal=False)) == pytest.approx(both)
    assert cost.bytes_sent("usp", (64, 1), problem(N, causal=False)) == pytest.approx(both)
    assert cost.bytes_sent("usp", (1, 16), problem(N, causal=False)) == pytest.approx(
        cost.bytes_sent("ulysses", (1, 16), problem(N, causal=False)))


def test_keep_gathered_trades_the_backward_gathers_for_memory():
    """attention2d keeping its gathered blocks: the backward sends the gathered q and K/V fewer bytes, holds
    them instead, and is predicted faster; the other strategies ignore it."""
    N, n, d = 65536, 65536 // 8, 16 * 128
    lean, kept = (cost.predict("attention2d", (4, 2), problem(N), H200, keep_gathered=keep) for keep in (False, True))
    held = (2 - 1) * n * d * 2 + (4 - 1) * n * 2 * d * 2  # q over the row of 2, k and v over the column of 4
    assert lean.bytes_sent - kept.bytes_sent == pytest.approx(held)
    assert kept.memory - lean.memory == pytest.approx(held)
    assert kept.time < lean.time
    assert cost.predict("ring", (1, 8), problem(N), H200, keep_gathered=True) == cost.predict("ring", (1, 8), problem(N), H200)


def test_causal_adds_the_zigzag_swaps_and_only_the_needed_sides():
    for strategy, grid in [("ring", (1, 8)), ("allgather_kv", (1, 8)), ("attention2d", (2, 4))]:
        assert cost.bytes_sent(strategy, grid, problem(causal=True)) > cost.bytes_sent(strategy, grid,
                                                                                       problem(causal=False))
    # ulysses shards heads: no swap; a 2-device zigzag moves one half of each array
    assert cost.bytes_sent("ulysses", (1, 8), problem(causal=True)) == cost.bytes_sent("ulysses", (1, 8),
                                                                                       problem(causal=False))
    assert cost._zigzag_halves(2) == 1 and cost._zigzag_halves(8) == 2 and cost._zigzag_halves(1) == 0


def test_zigzag_order_drops_the_swaps_of_the_strategies_that_balance_in_place():
    """An LM keeping its tokens in zigzag order: ring, attention2d, allgather_kv and double_ring move what they
    move non-causal; usp still swaps its row blocks (it attends in natural order), ulysses never did."""
    zigzag = dataclasses.replace(problem(causal=True), order="zigzag")
    for strategy, grid in [("ring", (1, 8)), ("allgather_kv", (1, 8)), ("attention2d", (2, 4)), ("attention2d", (8, 1)),
                           ("double_ring", (2, 4))]:
        assert cost.bytes_sent(strategy, grid, zigzag) == pytest.approx(cost.bytes_sent(strategy, grid,
                                                                                        problem(causal=False)))
    assert cost.bytes_sent("usp", (2, 4), zigzag) == cost.bytes_sent("usp", (2, 4), problem(causal=True))
    assert cost.predict("ring", (1, 8), zigzag, H200).time < cost.predict("ring", (1, 8), problem(causal=True), H200).time


def test_pipelined_ring_hides_its_transfers_when_the_blocks_are_long():
    slow_links = dataclasses.replace(H200, intra_bandwidth=1e9)
    long_blocks = cost.predict("ring", (1, 2), problem(seq=262144), H200)
    assert long_blocks.communication < 0.05 * long_blocks.compute
    exposed = cost.predict("ring", (1, 2), problem(seq=262144), slow_links)
    assert exposed.communication > long_blocks.communication
    # compute is the same whatever the strategy (balanced), except allgather_kv's masked causal blocks
    computes = {p.strategy: p.compute for p in cost.candidates(8, problem(), H200)}
    assert computes["ring"] == pytest.approx(problem().flops() / 8 / H200.attention_flops)
    assert computes["allgather_kv"] == pytest.approx(computes["ring"] / H200.masked_ratio)


def test_links_follow_the_node():
    eight_per_node = H200
    two_per_node = dataclasses.replace(H200, node_size=2)
    # Ulysses over seq_kv = 2 stays inside a 2-GPU node; the ring over seq_q = 8 leaves it.
    assert cost._link("seq_kv", (8, 2), two_per_node) == H200.intra_bandwidth
    assert cost._link("seq_q", (8, 2), two_per_node) == H200.inter_bandwidth
    assert cost._link("flat", (2, 4), eight_per_node) == H200.intra_bandwidth
    # double_ring with its inner ring inside the nodes beats the flat ring across them
    many = problem(seq=131072)
    ring = cost.predict("ring", (1, 16), many, two_per_node)
    double = cost.predict("double_ring", (8, 2), many, two_per_node)
    assert double.time <= ring.time


def test_choose_takes_the_fastest_that_fits_and_names_what_does_not():
    found = cost.candidates(8, problem(), H200)
    assert [p.time for p in found if p.fits] == sorted(p.time for p in found if p.fits)
    assert cost.choose(8, problem(), H200) == found[0]
    assert {(p.strategy, p.grid) for p in found} >= {("attention2d", (2, 4)), ("usp", (2, 4)), ("ring", (1, 8))}
    # heads=6: no ulysses on 8 devices, usp only where Pkv divides 6
    odd = cost.candidates(8, problem(heads=6, kv_heads=6), H200)
    assert "ulysses" not in {p.strategy for p in odd}
    assert {p.grid for p in odd if p.strategy == "usp"} == {(4, 2), (8, 1)}
    # allgather_kv holds all of K and V: the first to go when memory is short
    tight = cost.candidates(8, problem(seq=1 << 20), H200, memory_budget=8e9)
    assert not next(p for p in tight if p.strategy == "allgather_kv").fits
    with pytest.raises(ValueError, match="memory: no strategy fits; the smallest working set is"):
        cost.choose(8, problem(seq=1 << 20), H200, memory_budget=1e6)
    with pytest.raises(ValueError, match="node_size: expected a positive integer"):
        dataclasses.replace(H200, node_size=0)


def test_rank_correlation():
    assert cost.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert cost.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert cost.rank_correlation([1, 2, 3], [1, 1, 2]) == pytest.approx(math.sqrt(3) / 2)  # ties: mean ranks
    with pytest.raises(ValueError, match="same length"):
        cost.rank_correlation([1, 2], [1])


TINY_LM = ["model.mixer=attention", "model.d_model=64", "model.num_heads=8", "model.num_kv_heads=2",
           "data.seq_len=1024", "data.batch_size=8", "data.mqar.num_kv_pairs=4"]


def test_config_auto_resolves_to_a_strategy_and_grid():
    config = load_config(None, [*TINY_LM, "model.attention_parallel=auto", "mesh.seq_q=2", "mesh.seq_kv=4",
                                "mesh.data=1"])
    problem_ = attention_problem(config)
    assert (problem_.batch, problem_.seq, problem_.heads, problem_.kv_heads, problem_.head_dim, problem_.causal) == (
        8, 1024, 8, 2, 8, True)
    assert problem_.order == "zigzag"  # an all-attention LM keeps its tokens so (DecoderLM); a hybrid does not
    assert attention_problem(load_config(None, [*TINY_LM, "model.mixer=hybrid", "mesh.seq_kv=8", "mesh.data=1"])).order == "natural"
    choice = sequence_parallel_choice(config, device_kind="NVIDIA H200", platform="gpu")
    assert choice.system_name == "h200"
    assert (choice.strategy, choice.grid) == (choice.candidates[0].strategy, choice.candidates[0].grid)
    assert choice.grid[0] * choice.grid[1] == 8
    # kernels.attention=xla leaves only the strategies that need no backward from statistics
    xla = sequence_parallel_choice(load_config(None, [*TINY_LM, "model.attention_parallel=auto", "mesh.seq_kv=8",
                                                      "mesh.data=1", "kernels.attention=xla"]),
                                   device_kind="cpu", platform="cpu")
    assert {c.strategy for c in xla.candidates} == {"ulysses", "allgather_kv"}
    # a configured strategy is kept; one sequence device has nothing to choose
    fixed = sequence_parallel_choice(load_config(None, [*TINY_LM, "model.attention_parallel=ring", "mesh.seq_kv=8",
                                                        "mesh.data=1"]), device_kind="cpu", platform="cpu")
    assert (fixed.strategy, fixed.grid) == ("ring", (1, 8)) and fixed.candidates
    assert sequence_parallel_choice(load_config(None, [*TINY_LM, "model.attention_parallel=auto"])).candidates == ()
    assert system_preset("NVIDIA H100 80GB HBM3", "gpu") == "h100" and system_preset("cpu", "cpu") == "cpu"
    links = sequence_parallel_choice(load_config(None, [*TINY_LM, "mesh.seq_kv=8", "mesh.data=1",
                                                        "mesh.intra_node_gbps=100", "mesh.node_size=4"]),
                                     device_kind="NVIDIA H200", platform="gpu")
    assert links.system_name == "h200 (node_size=4, intra_bandwidth=1e+11)"


def test_cli_plan_prints_the_table_and_the_choice(capsys):
    assert main(["plan", "configs/mqar_attention.yaml", "model.attention_parallel=auto", "mesh.seq_q=2",
                 "mesh.seq_kv=2", "mesh.data=1", "--system", "h100"]) == 0
    out = capsys.readouterr().out
    assert "| strategy | grid | predicted ms |" in out and "system h100" in out
    assert "chosen by the cost model (attention_parallel=auto)" in out and " ←" in out
    assert main(["plan", "configs/mqar_attention.yaml", "mesh.seq_q=3"]) == 2  # seq_len not divisible by 3
    assert main(["plan", "configs/mqar_attention.yaml", "model.attention_keep_gathered=true", "mesh.seq_q=2",
                 "mesh.seq_kv=2", "mesh.data=1", "--system", "h100"]) == 0
    assert "| attention2d (keep_gathered) ← | 2x2 |" in capsys.readouterr().out


def test_bench_links_measures_a_ring_or_says_why_not(capsys):
    import jax

    from longseq.bench.links import run_links_bench

    rows = {row["pattern"]: row for row in run_links_bench(mib=1, iters=1, warmup=1)}
    assert rows["inter"]["error"] == "skipped: needs several processes (hosts)"
    if jax.local_device_count() > 1:
        assert rows["intra"]["error"] is None and rows["intra"]["devices"] == jax.local_device_count()
        assert rows["intra"]["bytes_per_device"] == 2**20 and rows["intra"]["gbps"] > 0
    else:
        assert rows["intra"]["error"] == "skipped: needs 2 devices in this process"
    with pytest.raises(ValueError, match="mib: expected a positive size"):
        run_links_bench(mib=0)
    assert main(["bench", "links", "--mib", "1", "--iters", "1", "--warmup", "1"]) == 0
    assert "| intra |" in capsys.readouterr().out
