"""The two universal implementations, ``"xla"`` and ``"xla_chunked"``, as registry entries."""

from __future__ import annotations

from attnjax._src.chunked import attention_chunked
from attnjax._src.masks import to_grouped
from attnjax._src.registry import AUTO_MATERIALISE_MAX_SCORES, Call, CallFeatures, Implementation
from attnjax._src.xla import attention_xla

_ALL = ("cpu", "cuda", "rocm", "tpu")


class XLA(Implementation):
    name = "xla"
    platforms = _ALL
    forward_mode = True
    supports_flex = True
    serves = ("every argument; materialises the B·N·T·S scores (memory O(B·N·T·S)); "
              "implementation=None takes it only while B·N·T·S <= 2**22, or at any size "
              "under forward-mode differentiation (jax.jvp)")

    def unsupported(self, f: CallFeatures, auto: bool):
        reason = super().unsupported(f, auto)
        if (reason is None and auto and f.scores > AUTO_MATERIALISE_MAX_SCORES
                and not f.forward_mode):
            reason = (f"B·N·T·S = {f.scores} > 2**22: implementation=None materialises the scores "
                      "only below that")
        return reason

    def __call__(self, call: Call):
        return attention_xla(call.query, call.key, call.value, call.bias, call.info,
                             **_common(call))


class XLAChunked(Implementation):
    name = "xla_chunked"
    platforms = _ALL
    supports_flex = True
    serves = "every argument; online softmax over chunks, memory O(T·H + B·N·chunk²)"

    def __call__(self, call: Call):
        T, S = call.query.shape[1], call.key.shape[1]
        K = call.key.shape[2]
        bias5 = None if call.bias is None else to_grouped(call.bias, K, T, S, 0)
        cq, ck = call.chunks.resolve(T, S)
        return attention_chunked(call.query, call.key, call.value, bias5, call.info,
                                 q_chunk=cq, k_chunk=ck, **_common(call))


def _common(call: Call) -> dict:
    return dict(scale=call.scale, logits_soft_cap=call.logits_soft_cap,
                dropout_rate=call.dropout_rate, seed=call.seed, precision=call.precision)
