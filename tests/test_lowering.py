"""Every implementation that claims TPU or GPU lowers there, forward and gradient, from this
CPU-only host: ``jax.export`` lowers a Pallas TPU kernel to Mosaic (``platforms=("tpu",)``) and the
XLA paths to StableHLO for ``("tpu",)`` and ``("cuda",)``. (cuDNN cannot be lowered without a GPU:
jax checks for cuDNN at trace time.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attnjax

B, T, S, N, K, H = 2, 200, 256, 4, 2, 64
KW = dict(is_causal=True, query_offset=40, key_value_seq_lengths=jnp.array([150, 200], jnp.int32))


def _fns(impl, **extra):
    def fwd(q, k, v):
        return attnjax.dot_product_attention(q, k, v, implementation=impl, **KW, **extra)

    def fwd_and_grad(q, k, v):
        # One export covers jit(fwd) and jit(grad): both are in the lowered module.
        grads = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2),
                         argnums=(0, 1, 2))(q, k, v)
        return fwd(q, k, v), grads

    return fwd, fwd_and_grad


def _export(fn, platform, dtype):
    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H))]
    with attnjax.target_platform(platform):
        exported = jax.export.export(jax.jit(fn), platforms=(platform,))(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_splash_lowers_to_mosaic_for_tpu(dtype):
    _, fwd_and_grad = _fns("splash", local_window_size=(64, 0), logits_soft_cap=30.0)
    text = _export(fwd_and_grad, "tpu", dtype)
    # Forward (with residuals), dK/dV and dQ kernels.
    assert text.count("tpu_custom_call") >= 3


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_chunked_lowers(platform):
    _, fwd_and_grad = _fns("xla_chunked", chunk_size=64)
    text = _export(fwd_and_grad, platform, jnp.bfloat16)
    assert "stablehlo.while" in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_lowers(platform):
    _, fwd_and_grad = _fns("xla")
    assert "stablehlo.dot_general" in _export(fwd_and_grad, platform, jnp.bfloat16)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_dispatch_lowers(platform):
    """implementation=None under target_platform picks that platform's first eligible kernel."""
    fwd, _ = _fns(None)
    q = jnp.zeros((B, T, N, H), jnp.bfloat16)
    k = v = jnp.zeros((B, S, K, H), jnp.bfloat16)
    with attnjax.target_platform(platform):
        chosen = attnjax.explain_dispatch(q, k, v, **KW).chosen
    # cuDNN cannot express query_offset=40 (top-left causal only): attnjax's own Pallas kernel
    # serves it on CUDA.
    assert chosen == {"tpu": "splash", "cuda": "pallas_gpu"}[platform]
    if platform == "tpu":
        assert "tpu_custom_call" in _export(fwd, platform, jnp.bfloat16)
    else:
        args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
                for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H))]
        with attnjax.target_platform("cuda"):
            exported = jax.export.export(
                jax.jit(fwd), platforms=("cuda",),
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
                    "__gpu$xla.gpu.triton")])(*args)
        assert "triton" in exported.mlir_module()


def _export_cuda(fn, args):
    with attnjax.target_platform("cuda"):
        exported = jax.export.export(
            jax.jit(fn), platforms=("cuda",),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("mods", ["document_blockmask_alibi", "t5_heads6"])
def test_pallas_gpu_flex_lowers_to_triton_for_cuda(mods):
    """A mask_mod gathering closed-over document ids (doc[b, q_idx]) with its block mask and an
    ALiBi score_mod (slopes[h]); a T5 table (table[bucket, h]) with 6 heads (shapes that are not
    powers of two): they lower into the Triton kernels, forward and gradient (also to the slopes
    or the table): the gathers become ref loads, the table gradient per-program partial sums.
    (Triton's compilation to PTX is NOT checked here.)"""
    from attnjax import masks

    b, n, kh, t = (B, N, K, T) if mods != "t5_heads6" else (3, 6, 3, S)

    def fwd(q, k, v, param, doc):
        if mods == "t5_heads6":
            return attnjax.dot_product_attention(
                q, k, v, implementation="pallas_gpu", is_causal=True,
                score_mod=masks.t5_relative_bias(param, max_distance=64))
        mask_mod = masks.and_masks(masks.causal, masks.document(doc))
        block_mask = attnjax.create_block_mask(mask_mod, b, None, t, S, block_size=64)
        return attnjax.dot_product_attention(
            q, k, v, implementation="pallas_gpu", mask_mod=mask_mod, block_mask=block_mask,
            score_mod=masks.alibi(param))

    def fwd_and_grad(q, k, v, param, doc):
        grads = jax.grad(lambda *a: jnp.sum(fwd(*a, doc).astype(jnp.float32) ** 2),
                         argnums=(0, 1, 2, 3))(q, k, v, param)
        return fwd(q, k, v, param, doc), grads

    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
            for s in ((b, t, n, H), (b, S, kh, H), (b, S, kh, H))]
    param = (n,) if mods != "t5_heads6" else (24, n)
    args += [jax.ShapeDtypeStruct(param, jnp.float32), jax.ShapeDtypeStruct((b, S), jnp.int32)]
    text = _export_cuda(fwd_and_grad, args)
    # Forward (twice: the primal and the VJP's), dK/dV and dQ kernels.
    assert text.count("__gpu$xla.gpu.triton") >= 3
    for name in ("attnjax_fwd", "attnjax_bwd_dkv", "attnjax_bwd_dq"):
        assert name in text
