"""Sequence-parallel attention (longseq.parallel.attention) against single-device reference attention.

Runs on whatever devices exist: `make test` runs this folder a second time with 8 simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), where every grid below fits; grids
larger than the machine are skipped (so a plain `pytest` on one CPU runs the 1-device cases, and
2 GPUs run the 2-device ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from longseq import parallel
from longseq.bench import comm
from longseq.parallel import cost
from longseq.config import FlashAttentionConfig
from longseq.ops import attention

# (data, seq_q, seq_kv): every grid of 8 first (usp and double_ring, compositions of ring and ulysses, which run
# on every grid, take the two with both of their levels split and no data axis), then one device (grids of 2 run
# in the keep_gathered, zigzag and window tests)
GRIDS_2D = [(1, 1, 8), (1, 2, 4), (1, 4, 2), (1, 8, 1), (2, 2, 2), (1, 1, 1)]
GRIDS_FLAT = [(1, 2, 4), (2, 2, 2), (1, 1, 1)]
CASES = [(strategy, grid) for grid in GRIDS_2D for strategy in ["attention2d"]] + \
        [(strategy, grid) for grid in GRIDS_2D[1:3] for strategy in ["usp", "double_ring"]] + \
        [(strategy, grid) for grid in GRIDS_FLAT for strategy in ["ring", "ulysses", "allgather_kv"]]


def make_mesh(grid) -> Mesh:
    if np.prod(grid) > jax.device_count():
        pytest.skip(f"needs {np.prod(grid)} devices, {jax.device_count()} available (make test simulates 8)")
    return Mesh(np.array(jax.devices()[:np.prod(grid)]).reshape(grid), ("data", "seq_q", "seq_kv"))


def random_inputs(seed, batch=2, seq=64, heads=8, kv_heads=2, head_dim=16):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, head_dim)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (batch, seq))), jnp.int32)
    return (q, k, v), weights, (ids, ids)


def outputs_and_grads(fn, qkv, weights):
    """fn's output and the gradients of sum(output * weights), from one compiled call."""
    def both(q, k, v):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(weights)
    return jax.jit(both)(*qkv)


def assert_matches_reference(qkv, weights, *, mesh, strategy, causal, segment_ids, window=None,
                             impl="reference", flash=None, atol=2e-5, **options):
    def sharded(q, k, v):
        return parallel.attention(q, k, v, mesh=mesh, strategy=strategy, causal=causal,
                                  segment_ids=segment_ids, window=window, impl=impl, flash=flash, **options)

    def single(q, k, v):
        return attention(q, k, v, causal=causal, segment_ids=segment_ids, window=window, impl="reference")[0]

    out, grads = outputs_and_grads(sharded, qkv, weights)
    out_ref, grads_ref = outputs_and_grads(single, qkv, weights)
    np.testing.assert_allclose(out, out_ref, atol=atol, rtol=atol)
    for grad, grad_ref, name in zip(grads, grads_ref, "qkv"):
        np.testing.assert_allclose(grad, grad_ref, atol=2 * atol, rtol=2 * atol, err_msg=f"d{name}")


# Causal on every grid (the masking, the skipped blocks and the load balance differ by grid); non-causal, whose
# blocks are all full, on one grid of 8 per strategy and on one device.
FULL_GRIDS = {"attention2d": [(1, 2, 4), (1, 8, 1), (1, 1, 1)], "usp": [(1, 2, 4)], "double_ring": [(1, 4, 2)],
              "ring": [(2, 2, 2)], "ulysses": [(1, 2, 4)], "allgather_kv": [(1, 2, 4)]}
STRATEGY_CASES = [(s, g, True) for s, g in CASES] + [(s, g, False) for s, g in CASES if g in FULL_GRIDS[s]]


@pytest.mark.parametrize("strategy,grid,causal", STRATEGY_CASES,
                         ids=[f"{'causal' if c else 'full'}-{s}-{'x'.join(map(str, g))}" for s, g, c in STRATEGY_CASES])
def test_strategy_matches_single_device_attention(strategy, grid, causal):
    """GQA 8:2, float32, forward and gradients of q, k, v."""
    mesh = make_mesh(grid)
    qkv, weights, _ = random_inputs(sum(grid) + causal)
    assert_matches_reference(qkv, weights, mesh=mesh, strategy=strategy, causal=causal, segment_ids=None)


@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_segment_ids_shard_with_the_tokens(strategy):
    mesh = make_mesh((1, 2, 4))
    qkv, weights, segment_ids = random_inputs(3)
    assert_matches_reference(qkv, weights, mesh=mesh, strategy=strategy, causal=True, segment_ids=segment_ids)


WINDOW_CASES = [(strategy, True) for strategy in parallel.STRATEGIES] + [("attention2d", False), ("ring", False)]


@pytest.mark.parametrize("strategy,causal", WINDOW_CASES, ids=[f"{s}-{'causal' if c else 'full'}" for s, c in WINDOW_CASES])
def test_sliding_window_crosses_device_boundaries(strategy, causal):
    """A window of 11 over chunks of 8 (2×4 grid): every device needs keys from its neighbours'."""
    mesh = make_mesh((1, 2, 4))
    qkv, weights, _ = random_inputs(5 + causal)
    assert_matches_reference(qkv, weights, mesh=mesh, strategy=strategy, causal=causal, segment_ids=None,
                             window=11)


def test_ring_keeps_only_its_own_chunk_for_the_backward():
    """The ring's custom_vjp saves q, k, v, out and lse: autodiff of its loop would also keep every
    step's K/V and each block's probabilities (more than 10× the inputs here)."""
    mesh = make_mesh((1, 1, 8))
    qkv, _, _ = random_inputs(7)

    def ring(q, k, v):
        return parallel.attention(q, k, v, mesh=mesh, strategy="ring", causal=True, impl="reference")

    backward = jax.eval_shape(lambda *qkv: jax.vjp(ring, *qkv)[1], *qkv)  # shapes only: nothing runs
    saved = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))
    q, k, v = qkv
    assert saved <= 2 * q.nbytes + k.nbytes + v.nbytes + q.nbytes // 8


@pytest.mark.parametrize("strategy", ["attention2d", "ring"])
def test_strategies_with_a_backward_from_statistics_refuse_xla_blocks(strategy):
    mesh = make_mesh((1, 1, 1))
    q = jnp.ones((2, 8, 4, 16))
    with pytest.raises(ValueError, match=f"impl: strategy '{strategy}' runs each block's backward from the merged"):
        parallel.attention(q, q, q, mesh=mesh, strategy=strategy, impl="xla")


def test_attention2d_keeps_only_its_own_chunk_for_the_backward():
    """attention2d's custom_vjp saves q, k, v, out and the row's lse, and gathers again in the
    backward: autodiff would keep the gathered query and key blocks and the blocks' partials."""
    mesh = make_mesh((1, 2, 4))
    qkv, _, _ = random_inputs(8)

    def attention2d(q, k, v):
        return parallel.attention(q, k, v, mesh=mesh, strategy="attention2d", causal=True, impl="reference")

    backward = jax.eval_shape(lambda *qkv: jax.vjp(attention2d, *qkv)[1], *qkv)  # shapes only
    saved = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))
    q, k, v = qkv
    row_lse = q.size // q.shape[-1] * 4 * 4  # [batch, heads, Pkv · n] float32 per device, 8 devices
    assert saved <= 2 * q.nbytes + k.nbytes + v.nbytes + row_lse + 64  # + a few bytes of flags


@pytest.mark.parametrize("grid", [(1, 2, 4), (1, 4, 2), (2, 2, 2), (1, 2, 1)], ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention2d_keeping_the_gathered_blocks_matches_single_device(grid, causal):
    mesh = make_mesh(grid)
    qkv, weights, segment_ids = random_inputs(11 + sum(grid) + causal)
    assert_matches_reference(qkv, weights, mesh=mesh, strategy="attention2d", causal=causal,
                             segment_ids=segment_ids if causal else None, keep_gathered=True)


def test_attention2d_keeping_the_gathered_blocks_saves_them_instead_of_gathering_again():
    """On a 4×2 grid each device gathers 4 chunks of K/V and 2 of q: kept, the backward holds them
    (more than the own-chunk residuals) and all-gathers 3·(k + v)/8 + q/8 bytes fewer, as the cost
    model counts. The backward is compiled alone (residuals as inputs): in one program with the
    forward, XLA:CPU merges the two passes' identical gathers, which GPUs' compiler does not."""
    mesh = make_mesh((1, 4, 2))
    qkv, _, _ = random_inputs(12)

    def backward_of(keep_gathered):
        def attention2d(q, k, v):
            return parallel.attention(q, k, v, mesh=mesh, strategy="attention2d", impl="reference",
                                      keep_gathered=keep_gathered)
        _, vjp = jax.vjp(attention2d, *qkv)
        saved = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp))
        backward = jax.jit(lambda vjp, dout: vjp(dout)).lower(vjp, qkv[0]).compile()
        return saved, comm.traffic(comm.parse_collectives(backward.as_text(), 8))["bytes_by_kind"]["all-gather"]

    q, k, v = qkv
    lean_saved, lean_gathered = backward_of(False)
    kept_saved, kept_gathered = backward_of(True)
    fewer = 3 * (k.nbytes + v.nbytes) // 8 + q.nbytes // 8  # per device: 3 of 4 K/V chunks, 1 of 2 q chunks
    assert kept_saved >= lean_saved + fewer
    assert kept_gathered == pytest.approx(lean_gathered - fewer)
    problem = cost.Problem(2, 64, 8, 2, 16, itemsize=4, causal=False)
    modelled = [cost.bytes_sent("attention2d", (4, 2), problem, keep_gathered=keep) for keep in (False, True)]
    assert modelled[0] - modelled[1] == pytest.approx(fewer)


def test_keep_gathered_is_for_attention2d_only():
    mesh = make_mesh((1, 1, 1))
    q = jnp.ones((2, 8, 4, 16))
    with pytest.raises(ValueError, match="keep_gathered: only strategy 'attention2d'"):
        parallel.attention(q, q, q, mesh=mesh, strategy="ring", keep_gathered=True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="real cuDNN needs GPUs")
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_with_real_cudnn_blocks_in_bfloat16(strategy, causal):
    """impl='auto' on GPUs: cuDNN per block, bfloat16, against the float32 reference."""
    mesh = make_mesh((1, 2, 2) if jax.device_count() >= 4 else (1, 1, 2))
    qkv, weights, _ = random_inputs(10, seq=1024, head_dim=64)
    qkv16 = tuple(x.astype(jnp.bfloat16) for x in qkv)

    def sharded(q, k, v):
        return parallel.attention(q, k, v, mesh=mesh, strategy=strategy, causal=causal).astype(jnp.float32)

    def single(q, k, v):
        return attention(q, k, v, causal=causal, impl="reference")[0]

    out, grads = outputs_and_grads(sharded, qkv16, weights)
    out_ref, grads_ref = outputs_and_grads(single, qkv, weights)
    for got, want in zip((out, *grads), (out_ref, *grads_ref)):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.max(np.abs(got - want)) < 3e-2 * np.max(np.abs(want))


@pytest.mark.parametrize("strategy", ["attention2d", "ring", "allgather_kv"])
def test_with_cudnn_blocks(strategy, fake_cudnn):
    """The per-block cuDNN path (block kinds, lax.switch on traced offsets, backward from merged
    statistics) with cuDNN's two calls replaced by the reference, which exists on CPU: the strategy
    must still match single-device attention. The GPU run checks the real cuDNN."""
    mesh = make_mesh((1, 2, 2) if jax.device_count() >= 4 else (1, 1, 2))
    qkv, weights, _ = random_inputs(9, seq=32)
    assert_matches_reference(qkv, weights, mesh=mesh, strategy=strategy, causal=True, segment_ids=None,
                             impl="cudnn")


@pytest.mark.parametrize("strategy", ["attention2d", "ring"])
def test_with_the_pallas_kernel_per_block(strategy):
    """Each block through the flash kernel (interpret mode on CPU), global offsets and the causal
    zigzag included: on a 2×2 grid where 4 devices exist (8 simulated CPUs), else 1×2 (2 GPUs)."""
    mesh = make_mesh((1, 2, 2) if jax.device_count() >= 4 else (1, 1, 2))
    qkv, weights, _ = random_inputs(4, seq=64)
    tiles = FlashAttentionConfig(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                                 block_k_dq=16)
    assert_matches_reference(qkv, weights, mesh=mesh, strategy=strategy, causal=True, segment_ids=None,
                             impl="pallas", flash=tiles)


def test_bad_arguments_are_named():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "seq_q", "seq_kv"))
    q = jnp.ones((2, 8, 4, 16))
    with pytest.raises(ValueError, match="strategy: expected one of 'attention2d', 'ring', 'ulysses', 'allgather_kv'"):
        parallel.attention(q, q, q, mesh=mesh, strategy="star")
    with pytest.raises(ValueError, match="mesh: has no axis 'seq'"):
        parallel.attention(q, q, q, mesh=mesh, strategy="ring", seq_q_axis="seq")
    with pytest.raises(ValueError, match="k: self-attention needs the sequence length of q"):
        parallel.attention(q, q[:, :4], q[:, :4], mesh=mesh, strategy="ring")


def test_sequence_and_heads_must_divide_over_the_devices():
    mesh = make_mesh((1, 2, 2))
    q = jnp.ones((2, 6, 4, 16))
    with pytest.raises(ValueError, match=r"q: seq=6 is not divisible by the 4 devices of mesh axes \('seq_q', 'seq_kv'\)"):
        parallel.attention(q, q, q, mesh=mesh, strategy="attention2d")
    q = jnp.ones((2, 8, 6, 16))
    with pytest.raises(ValueError, match="q: strategy 'ulysses' needs heads divisible by the 4 sequence devices"):
        parallel.attention(q, q, q, mesh=mesh, strategy="ulysses")


@pytest.mark.parametrize("strategy", ["ring", "none"])
def test_attention_layer_keeps_its_window_when_sequence_parallel(strategy):
    """The layer hands its sliding window to the sequence-parallel plan (also with strategy none)."""
    from flax import nnx

    from longseq.layers.attention import Attention

    mesh = make_mesh((1, 2, 4))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 32, 16)), jnp.float32)

    def layer(plan):
        return Attention(16, 4, 2, causal=True, window=5, impl="reference", sequence_parallel=plan,
                         rngs=nnx.Rngs(0))

    want = layer(None)(x)
    got = jax.jit(lambda x: layer(parallel.SequenceParallel(mesh, strategy))(x))(x)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_unmasked_neighbouring_key_pieces_join_into_one_block():
    """A P×1 grid's second-half query piece sees the first half of the keys (natural half-chunks, static
    positions) unmasked: one kernel call for them, not one per half-chunk; masked pieces stay apart."""
    from longseq.parallel.attention import Piece, _natural_halves, _visible_blocks, _zigzag_gathered_pieces

    keys = _natural_halves(2, 8)  # 4 half-chunks of 4 rows; halves 0, 0, 1, 1
    late_queries = Piece(0, 4, 12, 1)
    blocks = _visible_blocks(late_queries, keys, causal=True)
    assert [(b.row, b.rows, covered, masked) for b, covered, masked in blocks] == [
        (0, 8, [0, 1], False), (8, 4, [2], True), (12, 4, [3], True)]
    early_queries = Piece(0, 4, 0, 0)
    assert [covered for _, covered, _ in _visible_blocks(early_queries, keys, causal=True)] == [[0], [1]]
    assert [covered for _, covered, _ in _visible_blocks(early_queries, keys, causal=False)] == [[0, 1, 2, 3]]
    # zigzag-gathered keys of a column of 4 chunks (of 8): the first halves are rows 0-7 but positions 4 apart.
    keys = _zigzag_gathered_pieces([0, 2, 4, 6], 2, 8)
    assert [p.offset for p in keys] == [0, 2, 4, 6, 15, 13, 11, 9]
    late_queries = Piece(0, 1, 12, 1)
    blocks = _visible_blocks(late_queries, keys, causal=True)
    assert [(covered, masked) for _, covered, masked in blocks] == [([0, 1, 2, 3], False), ([4], True),
                                                                     ([5], True), ([6], True), ([7], True)]
    # with a window positions matter: only consecutive static positions join
    assert [covered for _, covered, _ in _visible_blocks(late_queries, keys, causal=True, window=4)][:4] == [
        [0], [1], [2], [3]]


def test_zigzag_order_balances_the_chunks_and_reorder_moves_rows_there_and_back():
    order = parallel.zigzag_order(16, 2)  # 4 pieces of 4: device 0 holds pieces 0 and 3, device 1 pieces 1, 2
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    causal_work = [sum(p + 1 for p in chunk) for chunk in parallel.zigzag_order(64, 8).reshape(8, 8)]
    assert len(set(causal_work)) == 1  # every device attends as many (query, key) pairs
    with pytest.raises(ValueError, match="seq_len: zigzag order over 4 devices needs a multiple of 8"):
        parallel.zigzag_order(20, 4)
    mesh = make_mesh((2, 2, 2))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 3)), jnp.float32)
    zigzag = jax.jit(lambda x: parallel.reorder(x, mesh=mesh, order="zigzag"))(x)
    np.testing.assert_array_equal(zigzag, x[:, parallel.zigzag_order(64, 4)])
    np.testing.assert_array_equal(parallel.reorder(zigzag, mesh=mesh, order="natural"), x)
    with pytest.raises(ValueError, match="order: expected one of 'natural', 'zigzag'"):
        parallel.reorder(x, mesh=mesh, order="striped")


# Causal on one grid per strategy (attention2d also on P×1 and with data=2, both sides gathered in zigzag halves
# on 2×4); one non-causal case, where the order is ignored.
ZIGZAG_CASES = [("attention2d", (1, 2, 4), True), ("attention2d", (1, 8, 1), True), ("attention2d", (2, 2, 2), True),
                ("ring", (1, 2, 4), True), ("double_ring", (1, 4, 2), True), ("allgather_kv", (2, 2, 2), True),
                ("ulysses", (1, 1, 8), True), ("usp", (1, 2, 4), True), ("attention2d", (2, 2, 2), False)]


@pytest.mark.parametrize("strategy,grid,causal", ZIGZAG_CASES,
                         ids=[f"{s}-{'x'.join(map(str, g))}-{'causal' if c else 'full'}" for s, g, c in ZIGZAG_CASES])
def test_strategy_in_zigzag_order_matches_single_device_attention(strategy, grid, causal):
    """Rows, ids and output in zigzag order: the same attention as one device's in natural order, forward and
    gradients (GQA, packed segments)."""
    mesh = make_mesh(grid)
    (q, k, v), weights, ids = random_inputs(5)
    order = parallel.zigzag_order(q.shape[1], grid[1] * grid[2])
    natural = np.argsort(order)

    def sharded(q, k, v):
        q, k, v = (x[:, order] for x in (q, k, v))
        out = parallel.attention(q, k, v, mesh=mesh, strategy=strategy, causal=causal, order="zigzag",
                                 segment_ids=tuple(x[:, order] for x in ids), impl="reference")
        return out[:, natural]

    def single(q, k, v):
        return attention(q, k, v, causal=causal, segment_ids=ids, impl="reference")[0]

    out, grads = outputs_and_grads(sharded, (q, k, v), weights)
    out_ref, grads_ref = outputs_and_grads(single, (q, k, v), weights)
    np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=2e-5)
    for grad, grad_ref, name in zip(grads, grads_ref, "qkv"):
        np.testing.assert_allclose(grad, grad_ref, atol=4e-5, rtol=4e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("strategy,grid,causal", [("attention2d", (1, 4, 2), True), ("attention2d", (1, 4, 2), False),
                                                   ("ring", (1, 1, 4), True)], ids=["attention2d-causal", "attention2d-full", "ring-causal"])
def test_sliding_window_in_zigzag_order(strategy, grid, causal):
    mesh = make_mesh(grid)
    (q, k, v), weights, _ = random_inputs(6)
    order = parallel.zigzag_order(q.shape[1], grid[1] * grid[2])
    natural = np.argsort(order)

    def sharded(q, k, v):
        out = parallel.attention(*(x[:, order] for x in (q, k, v)), mesh=mesh, strategy=strategy, causal=causal,
                                 window=11, order="zigzag", impl="reference")
        return out[:, natural]

    out, grads = outputs_and_grads(sharded, (q, k, v), weights)
    out_ref, grads_ref = outputs_and_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, window=11, impl="reference")[0], (q, k, v), weights)
    np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=2e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(grad, grad_ref, atol=4e-5, rtol=4e-5)


@pytest.mark.parametrize("strategy,grid", [("attention2d", (1, 2, 1)), ("attention2d", (1, 1, 2)), ("ring", (1, 1, 2))],
                         ids=["attention2d-2x1", "attention2d-1x2", "ring"])
def test_zigzag_order_swaps_nothing(strategy, grid):
    """Causal attention on rows already in zigzag order sends no half-chunk anywhere: no collective-permute in
    attention2d's compiled forward and backward (the ring keeps only its K/V passes) where natural order swaps."""
    mesh = make_mesh(grid)
    (q, k, v), weights, _ = random_inputs(7, seq=32)

    def permutes(order):
        def loss(q, k, v):
            out = parallel.attention(q, k, v, mesh=mesh, strategy=strategy, causal=True, order=order,
                                     impl="reference")
            return jnp.sum(out * weights)

        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
        return hlo.count("collective-permute-start") + hlo.count("collective-permute(")

    zigzag, natural = permutes("zigzag"), permutes("natural")
    if strategy == "attention2d":  # gathers and reduce-scatters only
        assert zigzag == 0
    assert natural - zigzag >= 3  # natural order swaps q (or k, v) in, dout in and dq (or dk, dv) back


def test_order_is_checked():
    mesh = make_mesh((1, 2, 2))
    (q, k, v), _, _ = random_inputs(0, seq=36)
    with pytest.raises(ValueError, match="order: expected one of"):
        parallel.attention(q, k, v, mesh=mesh, strategy="ring", order="striped")
    with pytest.raises(ValueError, match="q: order='zigzag': seq_len: zigzag order over 4 devices needs a multiple of 8"):
        parallel.attention(q, k, v, mesh=mesh, strategy="ring", order="zigzag")
