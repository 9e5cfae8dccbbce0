"""Test-session settings.

Float32 tests compare against float64 references with tight tolerances. On GPUs, XLA's default
float32 matmul precision is TF32 (10-bit mantissa), which would fail them for reasons unrelated to
the code under test: the tests pin full float32 precision. (Subprocess tests inherit it through the
environment variable.)
"""

import os

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")



import pytest  # noqa: E402


@pytest.fixture
def fake_cudnn(monkeypatch):
    """Replace cuDNN's two calls (forward with statistics, backward from statistics) by the dense
    reference, and let float32 through, so the cuDNN block logic (block kinds, lax.switch on traced
    offsets, the custom_vjp) runs on CPU. Returns the list of (call, causal) the fakes received."""
    import importlib

    from longseq.ops import attention_cudnn

    attention_module = importlib.import_module("longseq.ops.attention")  # the module, not the function
    from longseq.ops.attention import _attention_backward_reference, _attention_reference

    calls = []

    def forward(q, k, v, *, scale, causal, window):
        calls.append(("forward", causal))
        return _attention_reference(q, k, v, causal=causal, segment_ids=None, scale=scale, q_offset=0,
                                    kv_offset=0, window=window)

    def backward(q, k, v, out, lse, dout, *, scale, causal, window):
        calls.append(("backward", causal))
        return _attention_backward_reference(q, k, v, out, lse, dout, causal=causal, segment_ids=None,
                                             scale=scale, q_offset=0, kv_offset=0, window=window)

    monkeypatch.setattr(attention_cudnn, "_cudnn_forward", forward)
    monkeypatch.setattr(attention_cudnn, "_cudnn_backward", backward)
    monkeypatch.setattr(attention_module, "cudnn_supports",
                        lambda dtype, head_dim, segment_ids: None if segment_ids is None else "no ids")
    return calls
