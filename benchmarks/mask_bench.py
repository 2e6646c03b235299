"""Flexible-attention sweep: block skipping for masks given four ways, a causal mask_mod, ALiBi.

fwd+bwd (``jax.value_and_grad`` w.r.t. q, k, v) of ``attnjax.dot_product_attention``
(``implementation="xla_chunked"``, default chunk 512), B=1, N=8, H=64, float32, T=S=8192 by
default, side by side in one run (ratios are what to compare; the machine may be shared):

* ``causal``: plain causal attention over the whole row (``is_causal=True``), the baseline;
* packed documents, 16 documents of 512 tokens, causal within each, given as
  ``segments`` (segment ids + ``is_causal``), ``mask_mod+block_mask``
  (``and_masks(causal, document(ids))`` with its :class:`attnjax.BlockMask`) and ``dense``
  (a ``(B, 1, T, S)`` boolean ``mask``);
* ``causal_mask_mod``: causal as a ``mask_mod`` with its block mask, against ``is_causal``;
* ``plain`` and ``alibi``: no mask, without and with ALiBi as a ``score_mod``;
* ``jax.nn causal``: ``jax.nn.dot_product_attention(is_causal=True)`` (XLA), for reference.

Prints a table (with the CPU model and ISA) and writes JSON.

Usage::

    PYTHONPATH=. python benchmarks/mask_bench.py [--length 8192] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import masks


def cpu_info() -> dict:
    model, isa = platform.processor() or "unknown", "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        isa = "AVX-512" if " avx512f" in flags else ("AVX2" if " avx2" in flags else "other")
    except OSError:
        pass
    import os

    return dict(model=model, isa=isa, cores=os.cpu_count())


def time_round_robin(fns: dict, args, repeats: int, on_compiled=None):
    """Median seconds of each function over ``repeats`` rounds, the functions timed in turn
    within each round (so a slow spell of a shared host hits every case, not one), after one
    compiling call each. Returns ``{name: (median_s, compile_s)}``."""
    compile_s, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))  # compile + first run
        compile_s[name] = time.perf_counter() - t0
        if on_compiled is not None:
            on_compiled(name, compile_s[name])
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), compile_s[name]) for name in fns}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="mask_bench.json")
    ap.add_argument("--skip", nargs="*", default=[], help="case names to skip")
    args = ap.parse_args(argv)
    for name in ("length", "docs", "heads", "head_dim", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.length % args.docs:
        ap.error(f"--length {args.length} must be a multiple of --docs {args.docs} "
                 "(equal-length documents)")
    B, L, N, H = 1, args.length, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, N, H)), jnp.float32) for _ in range(3))
    doc = jnp.repeat(jnp.arange(args.docs, dtype=jnp.int32), L // args.docs)[None]
    doc_mod = masks.and_masks(masks.causal, masks.document(doc))
    doc_bm = attnjax.create_block_mask(doc_mod, B, None, L, L)
    causal_bm = attnjax.create_block_mask(masks.causal, None, None, L, L)
    dense = (doc[:, :, None] == doc[:, None, :]) & jnp.tril(jnp.ones((L, L), bool))[None]
    slopes = masks.alibi_slopes(N)

    def grad_of(**kw):
        impl = kw.pop("_fn", None)

        def loss(q, k, v):
            if impl is not None:
                return jnp.sum(impl(q, k, v))
            return jnp.sum(attnjax.dot_product_attention(
                q, k, v, implementation="xla_chunked", **kw))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    cases = {
        "causal": grad_of(is_causal=True),
        "docs: segments": grad_of(is_causal=True, query_segment_ids=doc,
                                  key_value_segment_ids=doc),
        "docs: mask_mod+block_mask": grad_of(block_mask=doc_bm),
        "docs: dense mask": grad_of(mask=dense[:, None]),
        "causal_mask_mod+block_mask": grad_of(block_mask=causal_bm),
        "plain": grad_of(),
        "alibi score_mod": grad_of(score_mod=masks.alibi(slopes)),
        "jax.nn causal": grad_of(_fn=lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True)),
    }
    info = cpu_info()
    print(f"CPU: {info['model']} ({info['isa']}, {info['cores']} cores); jax {jax.__version__}; "
          f"B={B} N={N} H={H} T=S={L} float32, fwd+bwd, median of {args.repeats} rounds "
          f"(cases timed in turn within each round)")
    unknown = [name for name in args.skip if name not in cases]
    if unknown:
        ap.error(f"--skip: unknown case names {unknown}; the cases are {list(cases)}")
    todo = {name: fn for name, fn in cases.items() if name not in args.skip}
    timed = time_round_robin(
        todo, (q, k, v), args.repeats,
        on_compiled=lambda name, c: print(f"  compiled {name:30s} {c:5.1f} s", flush=True))
    results = {}
    for name, (t, c) in timed.items():
        results[name] = dict(seconds=t, compile_seconds=c)
        print(f"  {name:30s} {t * 1e3:10.1f} ms   (compile {c:5.1f} s)", flush=True)
    with open(args.json, "w") as f:
        json.dump(dict(cpu=info, results=results), f, indent=1)

    def ratio(a, b):
        if a in results and b in results:
            return results[a]["seconds"] / results[b]["seconds"]
        return None

    ratios = {
        "causal / docs(segments) [target >= 5]": ratio("causal", "docs: segments"),
        "causal / docs(mask_mod+block_mask) [target >= 5]": ratio("causal",
                                                                  "docs: mask_mod+block_mask"),
        "docs mask_mod+block_mask / segments [target within 1.1]": ratio(
            "docs: mask_mod+block_mask", "docs: segments"),
        "docs dense mask / segments": ratio("docs: dense mask", "docs: segments"),
        "causal mask_mod+block_mask / is_causal [target <= 1.1]": ratio(
            "causal_mask_mod+block_mask", "causal"),
        "alibi score_mod / plain [target <= 1.3]": ratio("alibi score_mod", "plain"),
        "jax.nn causal / attnjax causal": ratio("jax.nn causal", "causal"),
    }
    print("Ratios:")
    for name, r in ratios.items():
        print(f"  {name:58s} {'-' if r is None else f'{r:6.2f}'}")
    with open(args.json, "w") as f:
        json.dump(dict(cpu=info, jax=jax.__version__, B=B, N=N, H=H, T=L, S=L,
                       repeats=args.repeats, results=results, ratios=ratios), f, indent=1)
    print(f"wrote {args.json}")
    return results, ratios


if __name__ == "__main__":
    main()
