"""``"pallas_gpu"`` as a registry entry: attnjax's own fused Pallas (Triton) kernel.

The kernel is in :mod:`attnjax._src.pallas_gpu`. It runs on NVIDIA/AMD GPUs, and on CPU only
inside :func:`attnjax.pallas_interpret` (Pallas interpret mode, for testing).
"""

from __future__ import annotations

from attnjax._src import pallas_config
from attnjax._src.masks import to_grouped
from attnjax._src.pallas_gpu import MAX_HEAD_DIM, attention_pallas_gpu
from attnjax._src.registry import Call, CallFeatures, Implementation


class PallasGPU(Implementation):
    name = "pallas_gpu"
    supports_flex = True
    platforms = ("cuda", "rocm")
    dtypes = ("float32", "float16", "bfloat16")
    serves = ("every mask kind in the kernel (causal, window, per-row query_offset, lengths, "
              "segment ids with block skipping, dense mask), bias and its gradient, soft cap (a "
              "Python float), dropout, GQA/MQA, Hv != H, head dims up to 256, mask_mod/score_mod "
              "traced into the kernel (gradients to the score_mod's arrays), block masks, sinks; "
              "not: float64, a traced soft cap, a mod that gathers from a computed array (does "
              "not lower to Triton)")

    def platform_reason(self, f: CallFeatures):
        if f.platform in self.platforms or f.pallas_interpret:
            return None
        return (f"runs on cuda/rocm (or interpreted on CPU inside attnjax.pallas_interpret()), "
                f"this call is on {f.platform}")

    def unsupported(self, f: CallFeatures, auto: bool):
        reason = super().unsupported(f, auto)
        if reason is not None:
            return reason
        if max(f.head_dim, f.value_head_dim) > MAX_HEAD_DIM:
            return (f"head dims up to {MAX_HEAD_DIM}, got H={f.head_dim}, "
                    f"Hv={f.value_head_dim}")
        if f.soft_cap_traced:
            return "a traced logits_soft_cap (the kernel's soft cap is a static float)"
        if f.flex_gpu_reason is not None and not f.pallas_interpret:
            return f.flex_gpu_reason
        return None

    def __call__(self, call: Call):
        T, S = call.query.shape[1], call.key.shape[1]
        K = call.key.shape[2]
        bias5 = None if call.bias is None else to_grouped(call.bias, K, T, S, 0)
        # An explicit interpret flag: the platform was decided by the registry (which honours
        # attnjax.target_platform for ahead-of-time lowering), not by jax.default_backend().
        return attention_pallas_gpu(
            call.query, call.key, call.value, bias5, call.info, scale=call.scale,
            logits_soft_cap=call.logits_soft_cap, dropout_rate=call.dropout_rate, seed=call.seed,
            precision=call.precision, block_sizes=call.chunk_size,
            interpret=pallas_config.interpret_enabled())
