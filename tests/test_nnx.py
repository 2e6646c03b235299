"""attnjax.nnx.MultiHeadAttention against the stock flax.nnx.MultiHeadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attnjax
import attnjax.nnx

F, N = 16, 4


def _stock(seed=0, **kw):
    kw.setdefault("decode", False)
    return nnx.MultiHeadAttention(num_heads=kw.pop("num_heads", N), in_features=F,
                                  rngs=nnx.Rngs(seed), **kw)


def _ours(seed=0, **kw):
    kw.setdefault("decode", False)
    return attnjax.nnx.MultiHeadAttention(num_heads=kw.pop("num_heads", N), in_features=F,
                                          rngs=nnx.Rngs(seed), **kw)


def _x(shape, seed=1):
    # NumPy draws the data: jax.random.normal would compile once per shape (about a second each).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _assert_trees_close(a, b, atol=2e-5, rtol=2e-5):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    assert len(la) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 2}, {"num_kv_heads": 1},
                                {"normalize_qk": True}, {"qkv_features": 32, "out_features": 8},
                                {"in_kv_features": 12, "use_bias": False}])
def test_same_parameter_tree_and_init(kw):
    stock, ours = _stock(**kw), _ours(**kw)
    s_state, o_state = nnx.state(stock, nnx.Param), nnx.state(ours, nnx.Param)
    assert jax.tree.map(jnp.shape, s_state) == jax.tree.map(jnp.shape, o_state)
    _assert_trees_close(s_state, o_state, atol=0, rtol=0)  # same initialisers, same rng use


def _loss_grads(model, *args, **kwargs):
    def loss(m):
        y = m(*args, **kwargs)
        return jnp.sum(jnp.sin(y)), y

    (val, y), g = nnx.value_and_grad(loss, has_aux=True)(model)
    return y, nnx.state(g, nnx.Param)


CASES = [
    dict(kw={}, call={}),
    dict(kw={}, call={"is_causal": True}),
    dict(kw={"num_kv_heads": 2}, call={"is_causal": True}),
    dict(kw={"num_kv_heads": 2, "normalize_qk": True}, call={}),
    dict(kw={}, call={"mask": "padding"}),
    dict(kw={"num_kv_heads": 2}, call={"mask": "padding", "is_causal": True}),
    dict(kw={"in_kv_features": 12}, call={"cross": True}),
]


# By default the chunked kernel on the cases that each add something: GQA with a padding mask and
# causal together, GQA with normalize_qk, cross attention. The cases they contain (unmasked, MHA
# causal, GQA causal, padding alone) and "xla" run with --run-slow.
PARITY = ([(c, "xla_chunked") for c in (CASES[3], CASES[5], CASES[6])]
          + [pytest.param(c, impl, marks=pytest.mark.slow)
             for c, impl in ((CASES[0], "xla_chunked"), (CASES[1], "xla_chunked"),
                             (CASES[2], "xla_chunked"), (CASES[4], "xla_chunked"),
                             (CASES[2], "xla"), (CASES[5], "xla"))])


def _id(c):
    return f"{c['kw']}-{sorted(c['call'])}" if isinstance(c, dict) else c


@pytest.mark.parametrize("case,implementation", PARITY, ids=_id)
def test_outputs_and_gradients_match_stock(case, implementation):
    B, T = 2, 11
    stock = _stock(**case["kw"])
    ours = _ours(seed=123, implementation=implementation, chunk_size=4, **case["kw"])
    nnx.update(ours, nnx.state(stock))  # load the stock checkpoint into ours
    call = dict(case["call"])
    args = [_x((B, T, F))]
    if call.pop("cross", False):
        args.append(_x((B, 7, 12), seed=2))
    if call.get("mask") == "padding":
        valid = jnp.array([[1] * T, [1] * 6 + [0] * (T - 6)])
        # key padding only: every query still sees key 0, so no row is fully masked
        call["mask"] = nnx.make_attention_mask(jnp.ones((B, T)), valid)
    y_s, g_s = _loss_grads(stock, *args, **call)
    y_o, g_o = _loss_grads(ours, *args, **call)
    np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_s), atol=2e-5, rtol=2e-5)
    _assert_trees_close(g_o, g_s, atol=5e-5, rtol=5e-5)


def test_flax_attention_fn_in_stock_module():
    B, T = 2, 9
    stock = _stock(num_kv_heads=2)
    plugged = _stock(num_kv_heads=2, attention_fn=attnjax.flax_attention_fn)
    x = _x((B, T, F))
    mask = nnx.make_causal_mask(jnp.ones((B, T)))
    call = nnx.jit(lambda m, x, mask: m(x, mask=mask))
    np.testing.assert_allclose(np.asarray(call(plugged, x, mask)), np.asarray(call(stock, x, mask)),
                               atol=2e-5, rtol=2e-5)
    # Extra leading batch dims are flattened and restored.
    x5 = _x((3, B, T, F))
    np.testing.assert_allclose(np.asarray(call(plugged, x5, None)),
                               np.asarray(call(stock, x5, None)), atol=2e-5, rtol=2e-5)


def test_attnjax_options_pass_through():
    """Window / soft cap / bias / segment ids reach the core: compare against calling the core
    on the module's own projections."""
    B, T = 2, 10
    m = _ours(num_kv_heads=2)
    x = _x((B, T, F))
    bias = 0.1 * _x((1, N, T, T), seed=5)
    seg = jnp.array([[0] * 4 + [1] * 6, [0] * 10])
    kw = dict(is_causal=True, local_window_size=(3, 0), logits_soft_cap=5.0, bias=bias,
              query_segment_ids=seg, key_value_segment_ids=seg)
    y = m(x, **kw)
    q, k, v = m.query(x), m.key(x), m.value(x)
    ref = m.out(attnjax.dot_product_attention(q, k, v, implementation="xla", **kw))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
    # and the options change the answer (the test can fail)
    assert not np.allclose(np.asarray(y), np.asarray(m(x, is_causal=True)), atol=1e-3)


def test_dropout():
    x = _x((2, 8, F))
    m = _ours(dropout_rate=0.3)
    y_det = m(x, deterministic=True)
    ref = _ours(dropout_rate=0.0)
    np.testing.assert_allclose(np.asarray(y_det), np.asarray(ref(x)), atol=1e-6)
    y1 = m(x, deterministic=False)
    y2 = m(x, deterministic=False)
    assert np.isfinite(np.asarray(y1)).all()
    assert not np.allclose(np.asarray(y1), np.asarray(y_det), atol=1e-4)
    assert not np.allclose(np.asarray(y1), np.asarray(y2), atol=1e-4)  # rng stream advances
    with pytest.raises(ValueError, match="deterministic"):
        _ours(dropout_rate=0.3)(x)


def test_decode_matches_stock_decode():
    B, L, T = 2, 12, 9
    x = _x((B, T, F))
    stock = _stock(num_kv_heads=2)
    ours = _ours(seed=7, num_kv_heads=2)
    nnx.update(ours, nnx.state(stock, nnx.Param))
    stock.init_cache((B, L, F))
    ours.init_cache((B, L, F))
    step = nnx.jit(lambda m, tok: m(tok, decode=True))
    for t in range(T):
        y_s = step(stock, x[:, t:t + 1])
        y_o = step(ours, x[:, t:t + 1])
        np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_s), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(ours.cache_index[...]), [T, T])
    np.testing.assert_allclose(np.asarray(ours.cached_key[...]),
                               np.asarray(stock.cached_key[...]), atol=1e-6)


def _doubled_attention(calls):
    """A custom attention_fn (twice the stock attention), counting its calls."""
    def fn(q, k, v, **kw):
        calls.append(k.shape)
        return 2.0 * nnx.dot_product_attention(q, k, v, **kw)
    return fn


def test_decode_with_custom_attention_fn_as_stock():
    """decode=True calls a custom attention_fn as the stock module does: token by token it gives
    the stock module's outputs (same parameters, same fn), and prefill, multi-token and ragged
    steps give the full causal forward pass of the stock module with that fn."""
    B, L, T = 2, 12, 9
    x = _x((B, T, F))
    calls_s, calls_o = [], []
    stock = _stock(num_kv_heads=2, attention_fn=_doubled_attention(calls_s))
    ours = _ours(seed=7, num_kv_heads=2, attention_fn=_doubled_attention(calls_o))
    nnx.update(ours, nnx.state(stock, nnx.Param))
    full = stock(x, mask=nnx.make_causal_mask(jnp.ones((B, T))))
    stock.init_cache((B, L, F))
    ours.init_cache((B, L, F))
    for t in range(T):
        y_s = stock(x[:, t:t + 1], decode=True)
        y_o = ours(x[:, t:t + 1], decode=True)
        np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_s), atol=2e-5, rtol=2e-5)
    assert len(calls_o) == T and calls_o[-1] == (B, L, 2, F // N)
    np.testing.assert_allclose(np.asarray(y_o), np.asarray(full[:, -1:]), atol=2e-5, rtol=2e-5)
    # prefill 4, a 3-token step with row 1 adding only 2 tokens, then single steps (jitted)
    ours.init_cache((B, L, F))
    step = nnx.jit(lambda m, tok, n: m(tok, decode=True, query_seq_lengths=n))
    y0 = step(ours, x[:, :4], jnp.array([4, 4]))
    y1 = step(ours, x[:, 4:7], jnp.array([3, 2]))
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y0[0], y1[0]], 0)),
                               np.asarray(full[0, :7]), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(y1[1, :2]), np.asarray(full[1, 4:6]), atol=2e-5,
                               rtol=2e-5)
    # row 1's padded third token: zero attention (as cached_attention), so the out projection's
    # bias alone
    pad = ours.out(jnp.zeros((N, F // N)))
    np.testing.assert_allclose(np.asarray(y1[1, 2]), np.asarray(pad), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours.cache_index[...]), [7, 6])
    y2 = step(ours, x[:, 7:8], jnp.array([1, 1]))
    np.testing.assert_allclose(np.asarray(y2[0]), np.asarray(full[0, 7:8]), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"attnjax options \['logits_soft_cap'\]"):
        ours(x[:, :1], decode=True, logits_soft_cap=5.0)
    with pytest.raises(ValueError, match="overflow"):
        ours(x[:, :6], decode=True)


def test_decode_with_custom_attention_fn_on_a_ring_buffer():
    """A ring buffer of W slots with a custom attention_fn: one token per call, each seeing the
    last W tokens (against the stock module with the fn and a windowed causal mask)."""
    B, T, W = 2, 9, 3
    x = _x((B, T, F))
    stock = _stock(num_kv_heads=2, attention_fn=_doubled_attention([]))
    ours = _ours(num_kv_heads=2, attention_fn=_doubled_attention([]))
    nnx.update(ours, nnx.state(stock, nnx.Param))
    i = jnp.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)
    full = stock(x, mask=mask[None, None])
    ours.init_cache((B, 16, F), window=W)
    step = nnx.jit(lambda m, tok: m(tok, decode=True))
    ys = jnp.concatenate([step(ours, x[:, t:t + 1]) for t in range(T)], 1)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(full), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="one token per call, got T=2"):
        ours(x[:, :2], decode=True)


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_and_steps_equal_full_causal_forward(window):
    B, T = 2, 13
    x = _x((B, T, F))
    stock = _stock(num_kv_heads=2)
    ours = _ours(num_kv_heads=2, chunk_size=4)
    mask = nnx.make_causal_mask(jnp.ones((B, T)))
    if window is not None:
        i = jnp.arange(T)
        mask = (mask > 0) & (i[None, :] > i[:, None] - window)[None, None]  # last `window`
    full = stock(x, mask=mask)  # independent reference: stock module, windowed causal mask
    ours.init_cache((B, 16, F), window=window)
    step = nnx.jit(lambda m, tok: m(tok, decode=True))
    parts = [step(ours, x[:, :5])]  # prefill 5
    parts.append(step(ours, x[:, 5:6]))  # single step
    parts.append(step(ours, x[:, 6:9]))  # multi-token step
    for t in range(9, T):
        parts.append(step(ours, x[:, t:t + 1]))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(parts, 1)), np.asarray(full),
                               atol=2e-5, rtol=2e-5)
    if window is not None:
        assert ours.cached_key[...].shape[1] == window


def test_decode_under_nnx_jit_with_donation():
    B, L = 1, 32
    m = _ours(num_kv_heads=2)
    m.init_cache((B, L, F))
    x = _x((B, 6, F))

    @nnx.jit(donate_argnums=0)
    def step(model, tok):
        return model(tok, decode=True)

    ys = [step(m, x[:, t:t + 1]) for t in range(6)]
    ref = _stock(num_kv_heads=2)(x, mask=nnx.make_causal_mask(jnp.ones((B, 6))))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, 1)), np.asarray(ref), atol=2e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="num_kv_heads"):
        _ours(num_kv_heads=3)
    m = _ours()
    with pytest.raises(ValueError, match="in_features=16"):
        m(_x((2, 5, 15)))
    with pytest.raises(ValueError, match="in_kv_features"):
        m(_x((2, 5, F)), _x((2, 5, 9)))
    with pytest.raises(ValueError, match="init_cache"):
        m(_x((2, 1, F)), decode=True)
    m.init_cache((2, 4, F))
    with pytest.raises(ValueError, match="batch mismatch"):
        m(_x((3, 1, F)), decode=True)
    m(_x((2, 3, F)), decode=True)
    with pytest.raises(ValueError, match="overflow"):
        m(_x((2, 2, F)), decode=True)
    with pytest.raises(ValueError, match="mask"):
        m(_x((2, 1, F)), decode=True, mask=jnp.ones((2, 1, 1, 4), bool))
    with pytest.raises(ValueError, match="sown|sow"):
        _ours()(_x((2, 5, F)), sow_weights=True)


class Block(nnx.Module):
    def __init__(self, vocab, d, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = attnjax.nnx.MultiHeadAttention(num_heads=4, in_features=d, num_kv_heads=2,
                                                   decode=False, implementation="xla_chunked",
                                                   chunk_size=8, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(self.ln1(h), is_causal=True)
        h = h + nnx.gelu(self.mlp(self.ln2(h)))
        return self.head(h)


def test_small_transformer_block_trains():
    vocab, T = 11, 24
    model = Block(vocab, 32, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    # a learnable sequence: token t+1 = (token t + 3) mod vocab
    start = jax.random.randint(jax.random.key(2), (8, 1), 0, vocab)
    seq = (start + 3 * jnp.arange(T + 1)[None]) % vocab

    @nnx.jit
    def train_step(model, opt, seq):
        def loss_fn(m):
            logits = m(seq[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(train_step(model, opt, seq)) for _ in range(25)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
