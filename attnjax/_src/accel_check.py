"""The accelerator check: run first on new hardware (``attnjax-accel-check`` or
``python -m attnjax.accel_check``).

1. Detects the backend and device model.
2. Correctness: every implementation eligible on this platform (``implementation=None``'s
   candidates plus every named one that serves the call) against a float64 reference computed on
   the host with NumPy, forward and gradients, over a grid of mask kinds × dtypes. Prints a table.
3. Speed: each eligible implementation side by side with ``jax.nn.dot_product_attention`` (its
   ``"xla"`` path, and its ``"cudnn"`` path on an NVIDIA GPU) for B=4, N=16, H=128,
   T=S in {2048, 8192, 32768}, bfloat16, forward and forward+backward, causal and not; TFLOP/s
   (forward ``4·B·N·T·S·H``, halved for causal; forward+backward 3.5× that). ``--quick`` (the
   default on CPU) uses small sizes instead.
4. ``--chunk-sweep``: ``xla_chunked`` forward+backward over chunk sizes, to choose that
   platform's default from a measurement.

attnjax's own Pallas kernel (``pallas_gpu``) is checked and timed on an NVIDIA/AMD GPU beside
cuDNN (``jax.nn``'s and attnjax's) and the XLA paths, plus a flexible-attention row
(``mask_mod`` causal + ALiBi ``score_mod``: ``pallas_gpu`` against ``xla_chunked``). On CPU it
cannot be timed: it is skipped (and the report says so), or with ``--pallas-interpret`` its
correctness is checked in Pallas interpret mode (with splash's), never its speed.

Writes everything to a JSON file (``--json``) and exits with status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform as host_platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnjax._src import pallas_config, registry
from attnjax._src.attention import dot_product_attention

TOLERANCES = {"float32": (2e-5, 5e-5), "float16": (3e-3, 6e-3), "bfloat16": (2.5e-2, 5e-2)}

# name -> (dot_product_attention kwargs builder(B, T, S, N, rng))
MASKS = ("plain", "causal", "causal_bottom_right", "window_left", "window_causal", "lengths",
         "segments", "dense_mask", "bias", "soft_cap", "empty_rows")


def _mask_kwargs(name: str, B: int, T: int, S: int, N: int, rng: np.random.Generator) -> dict:
    if name == "plain":
        return {}
    if name == "causal":
        return dict(is_causal=True)
    if name == "causal_bottom_right":
        return dict(is_causal=True, query_offset=S - T)
    if name == "window_left":
        return dict(local_window_size=(T // 4, 0))
    if name == "window_causal":
        return dict(local_window_size=(T // 4, T // 8), is_causal=True)
    if name == "lengths":
        return dict(query_seq_lengths=np.array([T - 7] + [T] * (B - 1), np.int32),
                    key_value_seq_lengths=np.array([S - 9] + [S // 2] * (B - 1), np.int32),
                    is_causal=True)
    if name == "segments":
        qs = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        ks = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
        return dict(query_segment_ids=qs, key_value_segment_ids=ks)
    if name == "dense_mask":
        m = rng.random((B, 1, T, S)) < 0.7
        return dict(mask=m)
    if name == "bias":
        return dict(bias=rng.standard_normal((1, N, T, S)).astype(np.float32))
    if name == "soft_cap":
        return dict(logits_soft_cap=5.0, is_causal=True)
    if name == "empty_rows":
        kv = np.array([0] + [S - 3] * (B - 1), np.int32)
        return dict(key_value_seq_lengths=kv)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------
# The float64 host reference (dense; written from the definition, independent of attnjax).


def _visible(B, N, T, S, kw) -> np.ndarray:
    i = np.arange(T)[None, :, None]
    j = np.arange(S)[None, None, :]
    off = np.broadcast_to(np.asarray(kw.get("query_offset", 0)), (B,))[:, None, None]
    vis = np.ones((B, T, S), bool)
    if kw.get("is_causal"):
        vis &= j <= i + off
    if kw.get("local_window_size") is not None:
        w = kw["local_window_size"]
        left, right = (w, w) if isinstance(w, int) else w
        vis &= (j >= i + off - left) & (j <= i + off + right)
    if kw.get("query_seq_lengths") is not None:
        vis &= i < np.asarray(kw["query_seq_lengths"])[:, None, None]
    if kw.get("key_value_seq_lengths") is not None:
        vis &= j < np.asarray(kw["key_value_seq_lengths"])[:, None, None]
    if kw.get("query_segment_ids") is not None:
        vis &= kw["query_segment_ids"][:, :, None] == kw["key_value_segment_ids"][:, None, :]
    vis = np.broadcast_to(vis[:, None], (B, N, T, S))
    if kw.get("mask") is not None:
        vis = vis & np.broadcast_to(kw["mask"], (B, N, T, S))
    return vis


def reference(q, k, v, dout, kw):
    """float64 ``(out, lse, dq, dk, dv)`` for BTNH inputs and attnjax's kwargs."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = kw.get("scale") or 1.0 / math.sqrt(H)
    kn, vn = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    raw = np.einsum("btnh,bsnh->bnts", q, kn) * scale
    cap = kw.get("logits_soft_cap")
    z = cap * np.tanh(raw / cap) if cap else raw
    if kw.get("bias") is not None:
        z = z + np.broadcast_to(np.asarray(kw["bias"], np.float64), z.shape)
    vis = _visible(B, N, T, S, kw)
    z = np.where(vis, z, -np.inf)
    m = z.max(-1, keepdims=True)
    empty = ~np.isfinite(m)
    p = np.exp(z - np.where(empty, 0.0, m))
    den = p.sum(-1, keepdims=True)
    w = np.where(empty, 0.0, p / np.where(empty, 1.0, den))
    lse = np.where(empty, -np.inf, np.log(np.where(empty, 1.0, den)) + m)[..., 0]
    out = np.einsum("bnts,bsnh->btnh", w, vn)
    dw = np.einsum("btnh,bsnh->bnts", dout, vn)
    dz = w * (dw - (dw * w).sum(-1, keepdims=True))
    draw = dz * (1 - np.tanh(raw / cap) ** 2) if cap else dz
    dq = np.einsum("bnts,bsnh->btnh", draw, kn) * scale
    dk = (np.einsum("bnts,btnh->bsnh", draw, q) * scale).reshape(B, S, K, G, H).sum(3)
    dv = np.einsum("bnts,btnh->bsnh", w, dout).reshape(B, S, K, G, -1).sum(3)
    return out, np.transpose(lse, (0, 2, 1)), dq, dk, dv


# ------------------------------------------------------------------------------------------


def device_info() -> dict:
    dev = jax.devices()[0]
    info = dict(backend=jax.default_backend(), platform=registry.current_platform(),
                device_kind=getattr(dev, "device_kind", "?"), device_count=jax.device_count(),
                jax=jax.__version__, tpu_interpret=registry.tpu_interpret_mode())
    if info["backend"] == "cpu":
        model, flags = host_platform.processor() or "?", set()
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
        isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "?")
        info.update(cpu_model=model, isa=isa)
    return info


@dataclasses.dataclass
class CheckRow:
    implementation: str
    mask: str
    dtype: str
    status: str  # "ok", "MISMATCH", "n/a", "ERROR"
    detail: str = ""
    max_err: float = 0.0


def _eligible(impl: str, q, k, v, kw) -> tuple[bool, str]:
    rep = dot_explain(q, k, v, kw)
    row = {n: (ok, why) for n, ok, why in rep.rows}[impl]
    if impl == "xla" and not row[0] and "2**22" in row[1]:
        return True, ""  # the size rule applies to implementation=None only
    return row


def dot_explain(q, k, v, kw):
    from attnjax._src.attention import explain_dispatch

    kw = dict(kw)
    return explain_dispatch(q, k, v, kw.pop("bias", None), kw.pop("mask", None), **kw)


def correctness(impls, dtypes, masks=MASKS, B=2, T=200, S=256, N=4, K=2, H=64,
                seed=0) -> list[CheckRow]:
    rows = []
    rng = np.random.default_rng(seed)
    for dtype in dtypes:
        for mask in masks:
            kw = _mask_kwargs(mask, B, T, S, N, rng)
            qkv = [rng.standard_normal(s) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H))]
            # The reference sees the inputs rounded to the dtype, as the library does.
            qkv = [np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64) for x in qkv]
            dout = np.asarray(jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
                              .astype(jnp.float32), np.float64)
            if "bias" in kw:
                kw["bias"] = np.asarray(jnp.asarray(kw["bias"], dtype).astype(jnp.float32))
            want = reference(*qkv, dout, kw)
            args = [jnp.asarray(x, dtype) for x in qkv]
            for impl in impls:
                ok, why = _eligible(impl, *args, kw)
                if not ok:
                    rows.append(CheckRow(impl, mask, jnp.dtype(dtype).name, "n/a", why))
                    continue
                try:
                    rows.append(_check_one(impl, mask, dtype, args, dout, kw, want))
                except Exception as e:  # noqa: BLE001 - reported, and the check fails
                    rows.append(CheckRow(impl, mask, jnp.dtype(dtype).name, "ERROR",
                                         f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def _check_one(impl, mask, dtype, args, dout, kw, want) -> CheckRow:
    kw = dict(kw)
    bias = kw.pop("bias", None)
    bias = None if bias is None else jnp.asarray(bias, dtype)
    m = kw.pop("mask", None)

    def f(q, k, v):
        return dot_product_attention(q, k, v, bias, m, implementation=impl, **kw)

    @jax.jit
    def run(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    got = run(*args, jnp.asarray(dout, dtype))
    got = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in got]
    ftol, gtol = TOLERANCES[jnp.dtype(dtype).name]
    worst, detail = 0.0, ""
    for name, g, w, tol in zip(("out", "dq", "dk", "dv"), got, (want[0], *want[2:]),
                               (ftol, gtol, gtol, gtol), strict=True):
        tol = tol * max(1.0, float(np.abs(w).max()) / 10) if name != "out" else tol
        if not np.all(np.isfinite(g)):
            return CheckRow(impl, mask, jnp.dtype(dtype).name, "MISMATCH", f"{name} not finite")
        err = np.abs(g - w) - tol * np.abs(w)
        rel = float(np.max(err) / tol)
        if rel > worst:
            worst, detail = rel, name
    status = "ok" if worst <= 1.0 else "MISMATCH"
    return CheckRow(impl, mask, jnp.dtype(dtype).name, status,
                    f"worst {detail} at {worst:.2f} of tolerance" if detail else "", worst)


# ------------------------------------------------------------------------------------------
# Timing.


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))



def _timed_row(row: dict, fn, args, flops: float, reps: int) -> dict:
    """``row`` with the median time of ``fn(*args)`` and its TFLOP/s, or the error that
    stopped it (e.g. out of memory), reported rather than raised."""
    try:
        sec = _time(fn, args, reps)
        row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported
        row.update(ms=None, tflops=None, error=f"{type(e).__name__}: "
                   f"{str(e).splitlines()[0][:160] if str(e) else ''}")
    return row

def timing(sizes, B, N, H, dtype, impls, reps, jax_nn_paths, causals=(False, True)) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    for T in sizes:
        q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))
        for causal in causals:
            flops_fwd = 4.0 * B * N * T * T * H * (0.5 if causal else 1.0)
            candidates = [(f"attnjax:{n}", dict(implementation=n)) for n in impls]
            candidates.append(("attnjax:auto", dict(implementation=None)))
            for path in jax_nn_paths:
                candidates.append((f"jax.nn:{path}", dict(jax_nn=path)))
            for name, opts in candidates:
                if "jax_nn" in opts:
                    path = opts["jax_nn"]

                    def f(q, k, v, path=path, causal=causal):
                        return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation=path)
                else:
                    if opts["implementation"] is not None:
                        ok, why = _eligible(opts["implementation"], q, k, v,
                                            dict(is_causal=causal))
                        if not ok:
                            continue
                    chosen = dot_explain(q, k, v, dict(is_causal=causal,
                                                       implementation=opts["implementation"]))
                    if opts["implementation"] is None:
                        name = f"attnjax:auto({chosen.chosen})"

                    def f(q, k, v, opts=opts, causal=causal):
                        return dot_product_attention(q, k, v, is_causal=causal, **opts)

                loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32))
                for mode, fn, flops in (
                    ("fwd", jax.jit(f), flops_fwd),
                    ("fwd+bwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2))), 3.5 * flops_fwd),
                ):
                    rows.append(_timed_row(
                        dict(name=name, T=T, S=T, causal=causal, mode=mode, B=B, N=N, H=H,
                             dtype=jnp.dtype(dtype).name), fn, (q, k, v), flops, reps))
    return rows


def flex_timing(sizes, B, N, H, dtype, reps) -> list[dict]:
    """Flexible attention (``mask_mod`` causal + ALiBi ``score_mod`` with slope gradients):
    ``pallas_gpu`` beside ``xla_chunked``, forward and forward+backward."""
    from attnjax import masks  # noqa: PLC0415

    rows = []
    rng = np.random.default_rng(3)
    slopes = masks.alibi_slopes(N)
    for T in sizes:
        q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))
        flops_fwd = 4.0 * B * N * T * T * H * 0.5
        for impl in ("pallas_gpu", "xla_chunked"):
            def f(q, k, v, s, impl=impl):
                return dot_product_attention(q, k, v, mask_mod=masks.causal,
                                             score_mod=masks.alibi(s), implementation=impl)

            loss = lambda q, k, v, s, f=f: jnp.sum(f(q, k, v, s).astype(jnp.float32))
            for mode, fn, flops in (
                ("fwd", jax.jit(f), flops_fwd),
                ("fwd+bwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), 3.5 * flops_fwd),
            ):
                rows.append(_timed_row(
                    dict(name=f"attnjax:{impl}[mask_mod+alibi]", T=T, S=T, causal=True,
                         mode=mode, B=B, N=N, H=H, dtype=jnp.dtype(dtype).name),
                    fn, (q, k, v, slopes), flops, reps))
    return rows


def chunk_sweep(T, B, N, H, dtype, chunks, reps) -> list[dict]:
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))
    rows = []
    for c in chunks:
        def loss(q, k, v, c=c):
            return jnp.sum(dot_product_attention(q, k, v, is_causal=True, chunk_size=c,
                                                 implementation="xla_chunked")
                           .astype(jnp.float32))

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            sec = _time(fn, (q, k, v), reps)
            rows.append(dict(chunk=c, T=T, ms=sec * 1e3))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(chunk=c, T=T, ms=None, error=f"{type(e).__name__}"))
    return rows


# ------------------------------------------------------------------------------------------


def _print_table(rows: list[dict], cols: list[str]) -> str:
    cells = [[("" if r.get(c) is None else (f"{r[c]:.3g}" if isinstance(r[c], float)
                                            else str(r[c]))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="attnjax-accel-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small timing sizes (default on CPU): B=1, N=4, H=64, T in {512, 1024}")
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--chunk-sweep", action="store_true",
                   help="time xla_chunked fwd+bwd (causal, T=8192; T=1024 with --quick) over "
                        "chunk sizes 128..2048")
    p.add_argument("--tpu-interpret", action="store_true",
                   help="on CPU: also check splash in Pallas TPU interpret mode (slow)")
    p.add_argument("--pallas-interpret", action="store_true",
                   help="on CPU: also check the Pallas kernels (pallas_gpu, splash) in Pallas "
                        "interpret mode (attnjax.pallas_interpret(); slow; correctness only)")
    p.add_argument("--sizes", type=int, nargs="*", help="timing lengths T=S")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--masks", nargs="*", choices=MASKS, help="mask kinds to check (default all)")
    p.add_argument("--dtypes", nargs="*", help="dtypes to check (default float32 bfloat16, "
                   "and float16 on GPU)")
    p.add_argument("--json", default="accel_check.json", help="where to write the results")
    args = p.parse_args(argv)

    ctx = contextlib.ExitStack()
    if args.tpu_interpret:
        from jax.experimental.pallas import tpu as pltpu

        ctx.enter_context(pltpu.force_tpu_interpret_mode())
    with ctx:
        info = device_info()
        plat = info["platform"]
        print("device:", ", ".join(f"{k}={v}" for k, v in info.items()))
        impls = [n for n in registry.names()
                 if registry.implementations()[n].platform_reason(
                     _platform_features(plat, info["tpu_interpret"])) is None]
        interpreted = []
        if args.pallas_interpret and plat == "cpu":
            # Correctness only: interpreted kernels say nothing about speed.
            interpreted = [n for n in ("pallas_gpu", "splash")
                           if n in registry.names() and n not in impls]
            ctx.enter_context(pallas_config.pallas_interpret())
            impls += interpreted
        skipped = {}
        if plat not in ("cuda", "rocm") and "pallas_gpu" not in impls:
            skipped["pallas_gpu"] = ("needs an NVIDIA/AMD GPU; on CPU --pallas-interpret checks "
                                     "its correctness in Pallas interpret mode (never its speed)")
        for n, why in skipped.items():
            print(f"{n}: skipped ({why})")
        dtypes = [jnp.float32, jnp.bfloat16] + ([jnp.float16] if plat in ("cuda", "rocm") else [])
        if args.dtypes:
            dtypes = [jnp.dtype(d) for d in args.dtypes]
        rows = correctness(impls, dtypes, tuple(args.masks or MASKS))
        print("\ncorrectness against the float64 host reference (B=2 T=200 S=256 N=4 K=2 H=64):")
        print(_print_table([dataclasses.asdict(r) for r in rows],
                           ["implementation", "mask", "dtype", "status", "detail"]))
        bad = [r for r in rows if r.status in ("MISMATCH", "ERROR")]
        result = dict(device=info, correctness=[dataclasses.asdict(r) for r in rows],
                      skipped=skipped, interpreted=interpreted)

        quick = args.quick or plat == "cpu"
        if not args.no_timing:
            if quick:
                sizes, B, N, H, dtype = args.sizes or [512, 1024], 1, 4, 64, jnp.float32
            else:
                sizes, B, N, H, dtype = args.sizes or [2048, 8192, 32768], 4, 16, 128, jnp.bfloat16
            paths = ["xla"] + (["cudnn"] if plat == "cuda" else [])
            timed = [n for n in impls if n not in interpreted]
            if interpreted:
                print(f"\ntiming skips {', '.join(interpreted)} (interpreted: no speed to measure)")
            t_rows = timing(sizes, B, N, H, dtype, timed, args.reps, paths)
            if "pallas_gpu" in timed:
                t_rows += flex_timing(sizes, B, N, H, dtype, args.reps)
            print(f"\ntiming (B={B} N={N} H={H} {jnp.dtype(dtype).name}, median of {args.reps}):")
            print(_print_table(t_rows, ["name", "T", "causal", "mode", "ms", "tflops", "error"]))
            result["timing"] = t_rows
        if args.chunk_sweep:
            T = 1024 if quick else 8192
            B, N, H, dtype = (1, 4, 64, jnp.float32) if quick else (4, 16, 128, jnp.bfloat16)
            s_rows = chunk_sweep(T, B, N, H, dtype, [128, 256, 512, 1024, 2048], args.reps)
            print(f"\nxla_chunked chunk sweep (causal fwd+bwd, T={T}):")
            print(_print_table(s_rows, ["chunk", "T", "ms", "error"]))
            result["chunk_sweep"] = s_rows

    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print(f"\nwrote {args.json}; {len(bad)} mismatch(es)")
    for r in bad:
        print(f"  {r.implementation} {r.mask} {r.dtype}: {r.status} {r.detail}")
    return 1 if bad else 0


def _platform_features(plat: str, interpret: bool) -> registry.CallFeatures:
    return registry.CallFeatures(platform=plat, tpu_interpret=interpret, dtype="float32", batch=1,
                                 q_len=1, kv_len=1, num_heads=1, num_kv_heads=1, head_dim=8,
                                 value_head_dim=8)


if __name__ == "__main__":
    sys.exit(main())
