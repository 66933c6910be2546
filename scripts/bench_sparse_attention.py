#!/usr/bin/env python3
"""Benchmark: sparse decode attention over a selected index set vs dense decode attention over the whole cache (issue 17).

One decode step (one query per head, GQA: Hq query heads over Hkv KV heads) over a cache of N keys; the sparse methods
attend to a fraction `frac` of the positions (random distinct positions per KV head, shared by the group's query heads).
Methods:
  dense     dense attention over all N keys, the faster of torch `scaled_dot_product_attention(enable_gqa=True)` and a
            grouped matmul (q viewed as [B, Hkv, G, D] against K once, fp32 softmax, @ V) — the baseline
  torch     `sparse_decode_attention(impl="torch")`: gathers the selected K/V rows (a copy), fp32 softmax
  triton    `sparse_decode_attention(impl="triton")`: gather + online softmax inside the kernel, split-K merge (CUDA only)
Both sparse paths are called as `tokexp.prune.dynamic` calls them, with `check_range=False` (the positions are in range by
construction; the host-side bounds check would add a device sync per call on CUDA).
Timing: all methods of one N are timed side by side, alternating (per round the dense calls, then each sparse call once
in a shuffled order; `repeats` rounds after a warm-up); reported is the median of CUDA-event times on GPU and, on CPU, the minimum over rounds of the calling thread's
CPU time (`time.thread_time`, with one torch thread: on a shared, oversubscribed machine wall time mostly measures the
wait for a core; with more threads, wall time).
Correctness: max abs difference to fp32 dense attention with the unselected keys masked out (grouped, no K/V repeat);
at the smallest N also the sparse paths over every position vs dense attention (`full_max_abs_diff`).
Memory is computed from the shapes (stated, not measured): `kv_read_mb` the K/V bytes each method reads; `extra_mb`
what it materializes beyond its inputs and output — dense: the fp32 logits and probabilities [B, Hq, N]; torch: the
gathered K/V rows (in the compute dtype, plus the input-dtype copy when that differs), the int64 positions, the mask
and the [B, Hq, K] logits/probabilities; triton: only the split-K partials (O [B, S, Hq, Dv], m and l [B, S, Hq], fp32).

Usage:
  .venv/bin/python scripts/bench_sparse_attention.py                 # CPU: dense vs torch path, N 4k..32k, 1..10 %
  python scripts/bench_sparse_attention.py --profile gpu             # GPU: adds the Triton kernel, bf16
  ... --n 4096,32768 --frac 0.01,0.1 --repeats 3 --json out.json
No GPU was lent while this was written: the CUDA numbers have not been measured; the kernel is tested in the interpreter.
"""
import argparse, json, math, random, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from tokexp.kernels import sparse as S  # noqa: E402
from tokexp.kernels.sparse import sparse_decode_attention  # noqa: E402

PROFILES = {
    "cpu": dict(device="cpu", dtype="float32", B=1, Hq=32, Hkv=8, D=128, ns=[4096, 8192, 16384, 32768],
                fracs=[0.01, 0.02, 0.05, 0.1], methods=["dense", "torch"], repeats=7, threads=1),
    "gpu": dict(device="cuda", dtype="bfloat16", B=1, Hq=32, Hkv=8, D=128, ns=[4096, 8192, 16384, 32768],
                fracs=[0.01, 0.02, 0.05, 0.1], methods=["dense", "torch", "triton"], repeats=50, threads=None),
}
MB = 2 ** 20


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def cpu_clock():
    "The CPU timer: the calling thread's CPU time with one torch thread (immune to waiting for a core on a shared machine), else wall time."
    return ("thread_cpu", time.thread_time) if torch.get_num_threads() == 1 else ("wall", time.perf_counter)


def time_side_by_side(fns, dev, repeats, seed=0, first=()):
    "{name: ms}: one warm-up call each, then `repeats` rounds calling every fn once: `first` in order, the rest shuffled; min on CPU, median on CUDA."
    for fn in fns.values(): fn()
    _sync(dev)
    clock = cpu_clock()[1]
    ts = {name: [] for name in fns}
    rest, rng = [n for n in fns if n not in first], random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(rest)  # no sparse call always runs right after the dense ones (or last)
        for name in [*first, *rest]:
            fn = fns[name]
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); fn(); b.record(); torch.cuda.synchronize(dev); ts[name].append(a.elapsed_time(b))
            else:
                t0 = clock(); fn(); ts[name].append((clock() - t0) * 1e3)
    return {name: (statistics.median(v) if dev.type == "cuda" else min(v)) for name, v in ts.items()}


def triton_splits(B, Hi, K, block_n=64, target=264):
    "Split count the Triton path uses for K positions (the same rule as `tokexp.kernels.sparse._auto_splits` + rounding)."
    cdiv = lambda a, b: -(-a // b)
    s = max(1, min(cdiv(K, 4 * block_n), cdiv(target, max(1, B * Hi))))
    per = cdiv(cdiv(max(K, 1), s), block_n) * block_n
    return max(1, cdiv(K, per))


def memory_model(method, B, Hq, Hkv, N, K, D, itemsize):
    "(K/V bytes read, bytes materialized beyond inputs and output) of one call, from the shapes."
    f32 = 4
    if method == "dense":
        return 2 * B * Hkv * N * D * itemsize, 2 * B * Hq * N * f32
    read = 2 * B * Hkv * K * D * itemsize  # the selected rows of K and V
    if method == "torch":
        gathered = 2 * B * Hkv * K * D * (f32 + (itemsize if itemsize != f32 else 0))  # index copy (+ fp32 cast)
        return read, gathered + B * Hkv * K * (8 + 1) + 2 * B * Hq * K * f32  # + int64 positions, mask; logits, probs
    if method == "triton":
        s = triton_splits(B, Hkv, K)
        return read, B * s * Hq * (D + 2) * f32
    raise ValueError(f"unknown method {method!r}; valid: dense, torch, triton")


def _reference(q, k, v, idx):
    "fp32 dense attention with the keys outside `idx` masked out: [B, Hq, 1, D] (grouped, no repeat of K/V)."
    B, Hq, _, D = q.shape; Hkv, N = k.shape[1], k.shape[2]; G = Hq // Hkv
    s = (q.float().view(B, Hkv, G, D) @ k.float().transpose(-1, -2)) * D ** -0.5  # [B, Hkv, G, N]
    keep = torch.zeros(B, Hkv, 1, N, dtype=torch.bool, device=q.device).scatter_(-1, idx[:, :, None].long(), True)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return (p @ v.float()).view(B, Hq, 1, -1)


def run(profile="cpu", ns=None, fracs=None, methods=None, dtype=None, B=None, Hq=None, Hkv=None, D=None, repeats=None,
        threads=None, seed=0, progress=print):
    "Run the benchmark; returns a list of row dicts (one per N × fraction × method, plus one dense row per N)."
    cfg = dict(PROFILES[profile])
    for key, val in dict(ns=ns, fracs=fracs, methods=methods, dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, D=D, repeats=repeats,
                         threads=threads).items():
        if val is not None: cfg[key] = val
    dev = torch.device(cfg["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"profile {profile!r} needs CUDA, which is not available here; use --profile cpu")
    if cfg["Hq"] % cfg["Hkv"]: raise SystemExit(f"Hq={cfg['Hq']} must be a multiple of Hkv={cfg['Hkv']}")
    if dev.type == "cpu" and cfg.get("threads"): torch.set_num_threads(cfg["threads"])
    dt = getattr(torch, cfg["dtype"])
    methods = [m for m in cfg["methods"] if m != "dense" and (m != "triton" or dev.type == "cuda")]
    B, Hq, Hkv, D = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"]
    G = Hq // Hkv
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    g = torch.Generator().manual_seed(seed)
    common = dict(B=B, Hq=Hq, Hkv=Hkv, D=D, dtype=cfg["dtype"], device=devname,
                  threads=torch.get_num_threads() if dev.type == "cpu" else None,
                  clock=cpu_clock()[0] if dev.type == "cpu" else "cuda_events")
    rows, full_diff = [], {}
    for N in sorted(cfg["ns"]):
        q = torch.randn(B, Hq, 1, D, generator=g).to(dev, dt)
        k = torch.randn(B, Hkv, N, D, generator=g).to(dev, dt)
        v = torch.randn(B, Hkv, N, D, generator=g).to(dev, dt)
        fns = {"dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
               "dense_grouped": lambda: (torch.softmax((q.view(B, Hkv, G, D) @ k.transpose(-1, -2)).float() * D ** -0.5, -1)
                                         .to(dt) @ v).view(B, Hq, 1, D)}
        sets = {}
        for frac in cfg["fracs"]:
            K = max(1, min(N, round(frac * N)))
            idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K).to(dev)
            sets[frac] = (K, idx)
            for m in methods:
                fns[(frac, m)] = (lambda idx=idx, m=m: sparse_decode_attention(q, k, v, idx, impl=m, check_range=False))
        ms = time_side_by_side(fns, dev, cfg["repeats"], seed=seed + N, first=("dense_sdpa", "dense_grouped"))  # dense first: evicts the caches
        dense_impl = min(("dense_sdpa", "dense_grouped"), key=lambda n: ms[n])
        t_dense = ms[dense_impl]
        read, extra = memory_model("dense", B, Hq, Hkv, N, N, D, q.element_size())
        rows.append(dict(N=N, frac=1.0, K=N, method="dense", dense_impl=dense_impl.split("_")[1], ms=t_dense,
                         speedup_vs_dense=1.0, max_abs_diff=0.0, kv_read_mb=read / MB, extra_mb=extra / MB, **common))
        progress(_fmt_row(rows[-1]))
        for frac, (K, idx) in sets.items():
            ref = _reference(q, k, v, idx)
            for m in methods:
                err = float((fns[(frac, m)]().float() - ref).abs().max())
                read, extra = memory_model(m, B, Hq, Hkv, N, K, D, q.element_size())
                rows.append(dict(N=N, frac=frac, K=K, method=m, dense_impl=None, ms=ms[(frac, m)],
                                 speedup_vs_dense=t_dense / ms[(frac, m)], max_abs_diff=err, kv_read_mb=read / MB,
                                 extra_mb=extra / MB, **common))
                progress(_fmt_row(rows[-1]))
            del ref
        if not full_diff:  # selected-all check at the smallest N: sparse over every position == dense attention
            every = torch.arange(N, device=dev).expand(B, Hkv, N)
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
            for m in methods: full_diff[m] = float((sparse_decode_attention(q, k, v, every, impl=m).float() - want).abs().max())
        del q, k, v, sets, fns
    for r in rows:
        if r["method"] in full_diff: r["full_max_abs_diff"] = full_diff[r["method"]]
    return rows


def breakeven(rows, method):
    "{N: (fraction where the method's time equals dense, extrapolated?)} from a least-squares line ms = a + b·K per N."
    out = {}
    for N in sorted({r["N"] for r in rows}):
        pts = [(r["K"], r["ms"]) for r in rows if r["N"] == N and r["method"] == method]
        dense = [r["ms"] for r in rows if r["N"] == N and r["method"] == "dense"]
        if len(pts) < 2 or not dense: continue
        n = len(pts); mk = sum(p[0] for p in pts) / n; mt = sum(p[1] for p in pts) / n
        var = sum((p[0] - mk) ** 2 for p in pts)
        b = sum((p[0] - mk) * (p[1] - mt) for p in pts) / var if var else 0.0
        a = mt - b * mk
        if b <= 0: out[N] = (math.inf if a < dense[0] else 0.0, True); continue
        f = (dense[0] - a) / b / N
        ks = [p[0] / N for p in pts]
        out[N] = (max(f, 0.0), not (min(ks) <= f <= max(ks)))
    return out


def _fmt_row(r):
    return (f"N={r['N']:6d} frac={r['frac']:<5} K={r['K']:6d} {r['method']:7s} {r['ms']:9.3f} ms  "
            f"x{r['speedup_vs_dense']:6.2f}  err={r['max_abs_diff']:.2e}  read={r['kv_read_mb']:8.2f} MB  extra={r['extra_mb']:8.2f} MB")


def table(rows):
    "A printable table of the rows."
    cols = ["N", "frac", "K", "method", "ms", "speedup_vs_dense", "max_abs_diff", "kv_read_mb", "extra_mb"]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    return "\n".join(["  ".join(f"{c:>16s}" for c in cols)] + ["  ".join(f"{fmt(r.get(c)):>16s}" for c in cols) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--n", help="comma-separated cache lengths")
    ap.add_argument("--frac", help="comma-separated selected fractions")
    ap.add_argument("--methods", help="comma-separated: dense,torch,triton")
    ap.add_argument("--dtype"); ap.add_argument("--repeats", type=int); ap.add_argument("--threads", type=int)
    ap.add_argument("--heads", help="Hq,Hkv e.g. 32,8"); ap.add_argument("--head-dim", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    hq, hkv = map(int, a.heads.split(",")) if a.heads else (None, None)
    rows = run(a.profile, ns=[int(x) for x in a.n.split(",")] if a.n else None,
               fracs=[float(x) for x in a.frac.split(",")] if a.frac else None,
               methods=a.methods.split(",") if a.methods else None, dtype=a.dtype, Hq=hq, Hkv=hkv, D=a.head_dim,
               repeats=a.repeats, threads=a.threads, seed=a.seed)
    print(); print(table(rows))
    for m in sorted({r["method"] for r in rows} - {"dense"}):
        for N, (f, ext) in breakeven(rows, m).items():
            print(f"{m}: breaks even with dense at N={N} near {100 * f:.1f} % selected" + (" (extrapolated)" if ext else ""))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
