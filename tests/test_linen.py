"""attnjax.linen.MultiHeadDotProductAttention against the stock flax.linen module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import attnjax
import attnjax.linen

F, N, B, T = 16, 4, 2, 10


def _x(shape, seed=1):
    # NumPy draws the data: jax.random.normal would compile once per shape (about a second each).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(a, b, atol=2e-5):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb and la
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol)


@pytest.mark.parametrize("kw", [{}, {"normalize_qk": True}, {"qkv_features": 32, "out_features": 8},
                                {"use_bias": False}])
def test_same_params_and_init(kw):
    x = _x((B, T, F))
    p_s = nn.MultiHeadDotProductAttention(num_heads=N, **kw).init(jax.random.key(0), x)
    p_o = attnjax.linen.MultiHeadDotProductAttention(num_heads=N, **kw).init(jax.random.key(0), x)
    _close(p_s, p_o, atol=0)


CASES = [
    ({}, {}),
    ({}, {"mask": "causal"}),
    ({}, {"mask": "padding"}),
    ({"normalize_qk": True}, {"mask": "causal"}),
    ({}, {"cross": True}),
]


# The unmasked case is covered by the others' code path, the causal mask by normalize_qk's case;
# they and "xla" run with --run-slow.
@pytest.mark.parametrize("kw,call,implementation",
                         [pytest.param(*CASES[0], "xla_chunked", marks=pytest.mark.slow),
                          pytest.param(*CASES[1], "xla_chunked", marks=pytest.mark.slow)]
                         + [(*c, "xla_chunked") for c in CASES[2:]]
                         + [pytest.param(*CASES[1], "xla", marks=pytest.mark.slow)])
def test_outputs_and_gradients_match_stock(kw, call, implementation):
    x = _x((B, T, F))
    stock = nn.MultiHeadDotProductAttention(num_heads=N, **kw)
    ours = attnjax.linen.MultiHeadDotProductAttention(num_heads=N, implementation=implementation,
                                                      chunk_size=4, **kw)
    call = dict(call)
    args = [x]
    if call.pop("cross", False):
        args.append(_x((B, 7, 12), seed=2))
    params = stock.init(jax.random.key(3), *args)  # a stock checkpoint, applied to ours unchanged
    if call.get("mask") == "causal":
        call["mask"] = nn.make_causal_mask(jnp.ones((B, T)))
    elif call.get("mask") == "padding":
        valid = jnp.arange(T)[None] < jnp.array([[T], [4]])
        call["mask"] = nn.make_attention_mask(jnp.ones((B, T)), valid)

    def loss(module, p):
        y = module.apply(p, *args, **call)
        return jnp.sum(jnp.sin(y)), y

    (_, y_s), g_s = jax.value_and_grad(lambda p: loss(stock, p), has_aux=True)(params)
    (_, y_o), g_o = jax.value_and_grad(lambda p: loss(ours, p), has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_s), atol=2e-5, rtol=2e-5)
    _close(g_o, g_s, atol=5e-5)


def test_gqa_against_stock_jax_attention():
    x = _x((B, T, F))
    ours = attnjax.linen.MultiHeadDotProductAttention(num_heads=N, num_kv_heads=2)
    params = ours.init(jax.random.key(0), x)
    p = params["params"]
    assert p["key"]["kernel"].shape == (F, 2, F // N)

    def ref(p):
        q = jnp.einsum("btf,fnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
        k = jnp.einsum("btf,fnh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
        v = jnp.einsum("btf,fnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.einsum("btnh,nhf->btf", o, p["out"]["kernel"]) + p["out"]["bias"]

    y = ours.apply(params, x, is_causal=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref(p)), atol=2e-5, rtol=2e-5)
    g_o = jax.grad(lambda pp: jnp.sum(jnp.sin(ours.apply({"params": pp}, x, is_causal=True))))(p)
    g_r = jax.grad(lambda pp: jnp.sum(jnp.sin(ref(pp))))(p)
    _close(g_o, g_r, atol=5e-5)


def test_decode_matches_stock_decode():
    L = 8
    x = _x((B, L, F))
    stock = nn.MultiHeadDotProductAttention(num_heads=N, decode=True)
    ours = attnjax.linen.MultiHeadDotProductAttention(num_heads=N, decode=True)
    v_s = stock.init(jax.random.key(0), x)
    v_o = ours.init(jax.random.key(0), x)
    assert v_o["cache"]["cache_index"].shape == (B,)
    params = {"params": v_s["params"]}
    c_s, c_o = v_s["cache"], v_o["cache"]
    step_s = jax.jit(lambda v, x: stock.apply(v, x, mutable=["cache"]))
    step_o = jax.jit(lambda v, x: ours.apply(v, x, mutable=["cache"]))
    for t in range(L):
        y_s, m_s = step_s({**params, "cache": c_s}, x[:, t:t + 1])
        y_o, m_o = step_o({**params, "cache": c_o}, x[:, t:t + 1])
        c_s, c_o = m_s["cache"], m_o["cache"]
        np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_s), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_and_steps_equal_full_forward(window):
    x = _x((B, T, F))
    ours = attnjax.linen.MultiHeadDotProductAttention(num_heads=N, decode=True,
                                                      decode_window=window)
    full_mod = nn.MultiHeadDotProductAttention(num_heads=N)
    variables = ours.init(jax.random.key(0), jnp.zeros((B, 16, F)))
    params = {"params": variables["params"]}
    mask = nn.make_causal_mask(jnp.ones((B, T))) > 0
    if window is not None:
        i = jnp.arange(T)
        mask = mask & (i[None, :] > i[:, None] - window)[None, None]
    full = full_mod.apply(params, x, mask=mask)
    cache = variables["cache"]
    outs = []
    step = jax.jit(lambda v, x: ours.apply(v, x, mutable=["cache"]))
    for a, b in [(0, 4), (4, 5), (5, 8), (8, 9), (9, 10)]:
        y, m = step({**params, "cache": cache}, x[:, a:b])
        cache = m["cache"]
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                               atol=2e-5, rtol=2e-5)


def test_bad_input():
    x = _x((B, T, F))
    with pytest.raises(ValueError, match="num_kv_heads"):
        attnjax.linen.MultiHeadDotProductAttention(num_heads=4, num_kv_heads=3).init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match="qkv_features"):
        attnjax.linen.MultiHeadDotProductAttention(num_heads=3).init(jax.random.key(0), x)
    m = attnjax.linen.MultiHeadDotProductAttention(num_heads=N, decode=True)
    v = m.init(jax.random.key(0), jnp.zeros((B, 4, F)))
    with pytest.raises(ValueError, match="batch mismatch"):
        m.apply(v, _x((B + 1, 1, F)), mutable=["cache"])
    _, mut = m.apply(v, _x((B, 3, F)), mutable=["cache"])
    with pytest.raises(ValueError, match="overflow"):
        m.apply({**v, **mut}, _x((B, 2, F)), mutable=["cache"])
    with pytest.raises(ValueError, match="mask"):
        m.apply(v, _x((B, 1, F)), mask=jnp.ones((B, 1, 1, 4), bool), mutable=["cache"])


def test_custom_attention_fn_or_einsums_raise_instead_of_being_ignored():
    """The stock module calls a custom attention_fn and custom einsum classes; attnjax's module
    always attends with attnjax, so it refuses them (it used to ignore them silently), and
    accepts its own default and attnjax.flax_attention_fn."""
    x = _x((B, T, F))
    doubled = lambda q, k, v, **kw: 2.0 * nn.dot_product_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match=r"attention_fn=.*stock flax.linen"):
        attnjax.linen.MultiHeadDotProductAttention(num_heads=N, attention_fn=doubled).init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\['qk_attn_weights_einsum_cls'\].*not supported"):
        attnjax.linen.MultiHeadDotProductAttention(
            num_heads=N, qk_attn_weights_einsum_cls=lambda: jnp.einsum).init(jax.random.key(0), x)
    plain = attnjax.linen.MultiHeadDotProductAttention(num_heads=N)
    params = plain.init(jax.random.key(0), x)
    same = attnjax.linen.MultiHeadDotProductAttention(num_heads=N,
                                                      attention_fn=attnjax.flax_attention_fn)
    np.testing.assert_array_equal(np.asarray(same.apply(params, x)),
                                  np.asarray(plain.apply(params, x)))
