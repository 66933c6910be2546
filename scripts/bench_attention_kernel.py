#!/usr/bin/env python3
"""Benchmark: attention importance (per-key Σ_i w_i·softmax(q_i·Kᵀ)) — kernel vs eager vs recompute, side by side (issue 7).

Scenarios (GQA: Hq query heads over Hkv KV heads, causal, queries = the last Nq positions):
  h2o      Nq = Nk, w = 1: score a whole prefill (H2O, LazyLLM-style prefill pruning)
  window   Nq = `window` last queries, w = 1: SnapKV observation window / TOVA-style decode scoring
Methods, all computing the same [B, Hkv, Nk] scores from the same Q and K:
  triton     `attention_importance(impl="triton")`: two-pass kernel (lse, then key-tiled column sums) — CUDA only
  torch      `attention_importance(impl="torch")`: query-chunked torch path, O(chunk·Nk) extra memory
  eager      transformers-eager style: repeat_kv, logits in the input dtype, softmax in fp32 cast back, column sum
             (what kvpress's ObservedAttention gets from `output_attentions=True`)
  recompute  kvpress SnapKV/TOVA style: repeat K for GQA, fp32 logits over the query window, softmax, weighted sum
For each it reports the median time, the peak extra memory (beyond Q and K), the max abs difference to `torch`, the
speedup of the kernel (or the torch path) over eager/recompute and, on GPU, a roofline floor and the measured/floor ratio.

Memory: on CUDA, `torch.cuda.max_memory_allocated` minus the allocation before the call. On CPU, the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before each call) minus the resident set before the call; the
run first asks glibc (mallopt) to serve every allocation >= 64 KiB with its own mmap and to trim freed heap, so freed
tensors leave the resident set and a later call cannot hide its allocations in memory an earlier one left behind.
Resolution is therefore ~64 KiB; smaller allocations are not seen.

Roofline (GPU): FLOPs = 2·D per visible (query, key) pair per query head, once per QKᵀ pass (two passes when the kernel
computes lse itself); bytes = Q and K read once, w/lse read, scores written (the floor) — and, for reference, the
tiled traffic of this kernel (K read once per pass-2 block, Q read once per key block). floor = max(FLOPs/peak_flops,
bytes/peak_bw). Peaks come from the table below (dense tensor-core bf16/fp16, non-tensor fp32), or from --peak-tflops /
--peak-gbps.

Usage:
  .venv/bin/python scripts/bench_attention_kernel.py                       # CPU: torch path vs eager/recompute
  python scripts/bench_attention_kernel.py --profile gpu                   # GPU: adds the Triton kernel, Nk up to 32k
  ... --nk 1024,4096 --scenarios window --dtype bfloat16 --json out.json
  python scripts/bench_attention_kernel.py --profile gpu --sweep-blocks    # time a grid of kernel tile sizes
No GPU was lent while this was written: the CUDA path is exercised by the tests only under TRITON_INTERPRET=1.
"""
import argparse, json, math, os, re, statistics, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from tokexp.kernels import attention as A  # noqa: E402

PROFILES = {
    "cpu": dict(device="cpu", dtype="float32", B=1, Hq=8, Hkv=2, D=64, nks=[256, 512, 1024, 2048],
                scenarios=["h2o", "window"], window=64, methods=["torch", "eager", "recompute"], repeats=5, threads=1),
    "gpu": dict(device="cuda", dtype="bfloat16", B=1, Hq=32, Hkv=8, D=128, nks=[1024, 2048, 4096, 8192, 16384, 32768],
                scenarios=["h2o", "window"], window=64, methods=["triton", "torch", "eager", "recompute"], repeats=20, threads=None),
}

# name regex -> (dense bf16/fp16 tensor TFLOP/s, fp32 non-tensor TFLOP/s, HBM GB/s); vendor datasheet figures (no sparsity)
PEAKS = [
    (r"H200", (989.0, 67.0, 4800.0)),
    (r"H100.*(NVL)", (835.0, 60.0, 3900.0)),
    (r"H100.*PCIe", (756.0, 51.0, 2000.0)),
    (r"H100", (989.0, 67.0, 3350.0)),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    (r"A100", (312.0, 19.5, 2039.0)),
]


# ---------------------------------------------------------------- baselines
def repeat_kv(k, G):
    "transformers' repeat_kv: [B, Hkv, N, D] -> [B, Hkv*G, N, D] (a copy)."
    B, H, N, D = k.shape
    return k if G == 1 else k[:, :, None].expand(B, H, G, N, D).reshape(B, H * G, N, D)


def _mask(Nq, Nk, device):
    return A._causal_mask(Nq, Nk, device)


def eager_importance(q, k, w=None, causal=True):
    "transformers eager attention weights (logits in the input dtype, fp32 softmax cast back) + weighted column sum."
    B, Hq, Nq, D = q.shape; Hkv, Nk = k.shape[1], k.shape[2]; G = Hq // Hkv
    s = torch.matmul(q, repeat_kv(k, G).transpose(2, 3)) * D**-0.5
    if causal: s = s.masked_fill(~_mask(Nq, Nk, q.device), torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    del s
    wq = torch.ones(Nq, device=q.device, dtype=torch.float32) if w is None else w.float()
    sc = torch.einsum("bhqn,q->bhn", p.float(), wq) if w is not None else p.float().sum(-2)
    return sc.view(B, Hkv, G, Nk).sum(2)


def recompute_importance(q, k, w=None, causal=True):
    "kvpress SnapKV/TOVA style: repeat K for GQA, fp32 logits for the (window) queries, softmax, weighted sum."
    B, Hq, Nq, D = q.shape; Hkv, Nk = k.shape[1], k.shape[2]; G = Hq // Hkv
    kr = repeat_kv(k, G)
    s = torch.matmul(q.float(), kr.float().transpose(2, 3)) / math.sqrt(D)
    if causal: s = s.masked_fill(~_mask(Nq, Nk, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    sc = p.sum(-2) if w is None else torch.einsum("bhqn,q->bhn", p, w.float())
    return sc.view(B, Hkv, G, Nk).sum(2)


def method_fn(name, q, k, causal=True, **kw):
    if name == "triton": return lambda: A.attention_importance(q, k, causal=causal, impl="triton", **kw)
    if name == "torch": return lambda: A.attention_importance(q, k, causal=causal, impl="torch")
    if name == "eager": return lambda: eager_importance(q, k, causal=causal)
    if name == "recompute": return lambda: recompute_importance(q, k, causal=causal)
    raise ValueError(f"unknown method {name!r}; valid: triton, torch, eager, recompute")


# ---------------------------------------------------------------- measuring
def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def time_fn(fn, dev, repeats, warmup=1):
    "Wall time in ms: median of CUDA-event timings on GPU; on CPU the minimum (robust to other jobs on a shared box)."
    for _ in range(warmup): fn()
    _sync(dev)
    ts = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize(dev); ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts) if dev.type == "cuda" else min(ts)


def exact_cpu_rss_accounting():
    "glibc only: mmap every allocation >= 64 KiB and trim freed heap, so VmHWM deltas track tensor allocations."
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 16))
    except (OSError, AttributeError):
        return False


def _proc_kb(key):
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_extra_bytes(fn, dev):
    "Peak memory the call adds on top of what is live before it, and its result."
    if dev.type == "cuda":
        _sync(dev); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        r = fn(); _sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base, r
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _proc_kb("VmRSS")
        r = fn()
        return (_proc_kb("VmHWM") - base) * 1024, r
    except OSError:  # not Linux: no peak measurement on CPU
        return None, fn()


def visible_pairs(Nq, Nk, causal):
    "Number of (query, key) pairs with key visible to query."
    if not causal: return Nq * Nk
    off = Nk - Nq
    return Nq * off + Nq * (Nq + 1) // 2


def cost_model(B, Hq, Hkv, Nq, Nk, D, itemsize, causal=True, passes=2, block_m=64, block_n=64):
    "FLOPs and bytes of the importance computation (floor) and of this kernel's tiled traffic."
    P = visible_pairs(Nq, Nk, causal)
    frac = P / max(1, Nq * Nk)  # share of (query tile, key tile) pairs not skipped by causality (approximately)
    flops = passes * 2.0 * D * P * B * Hq
    qb, kb = B * Hq * Nq * D * itemsize, B * Hkv * Nk * D * itemsize
    small = B * Hq * Nq * 4 * 2 + B * Hkv * Nk * 4  # w + lse read, scores written
    floor_bytes = qb + kb + small
    tiled = kb + qb * math.ceil(Nk / block_n) * frac + small  # pass 2: K once, Q once per key block
    if passes == 2: tiled += qb + kb * (Hq // Hkv) * math.ceil(Nq / block_m) * frac  # pass 1: Q once, K per query tile
    return dict(flops=flops, floor_bytes=floor_bytes, tiled_bytes=tiled, pairs=P)


def device_peaks(dev, dtype, peak_tflops=None, peak_gbps=None):
    "(TFLOP/s for this dtype, GB/s, device name); None where unknown."
    if dev.type != "cuda": return peak_tflops, peak_gbps, "cpu"
    name = torch.cuda.get_device_name(dev)
    for pat, (tc, f32, bw) in PEAKS:
        if re.search(pat, name):
            return (peak_tflops or (f32 if dtype == torch.float32 else tc)), (peak_gbps or bw), name
    return peak_tflops, peak_gbps, name


# ---------------------------------------------------------------- the run
def run(profile="cpu", nks=None, scenarios=None, methods=None, dtype=None, B=None, Hq=None, Hkv=None, D=None,
        window=None, repeats=None, seed=0, peak_tflops=None, peak_gbps=None, memory=True, progress=print):
    "Run the benchmark; returns a list of row dicts (one per scenario × Nk × method)."
    cfg = dict(PROFILES[profile])
    for key, v in dict(nks=nks, scenarios=scenarios, methods=methods, dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, D=D,
                       window=window, repeats=repeats).items():
        if v is not None: cfg[key] = v
    dev = torch.device(cfg["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"profile {profile!r} needs CUDA, which is not available here; use --profile cpu")
    dt = getattr(torch, cfg["dtype"])
    if cfg.get("threads"): torch.set_num_threads(cfg["threads"])  # CPU: one thread is far steadier on a shared box
    if dev.type == "cpu" and memory: exact_cpu_rss_accounting()
    methods = [m for m in cfg["methods"] if m != "triton" or dev.type == "cuda"]
    tflops, gbps, devname = device_peaks(dev, dt, peak_tflops, peak_gbps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for m in methods:  # one-time costs (thread pools, kernel compilation) stay out of the measurements
        method_fn(m, torch.randn(1, cfg["Hq"], 16, cfg["D"]).to(dev, dt), torch.randn(1, cfg["Hkv"], 16, cfg["D"]).to(dev, dt))()
    rows = []
    for scen in cfg["scenarios"]:
        for Nk in cfg["nks"]:
            Nq = Nk if scen == "h2o" else min(cfg["window"], Nk)
            q = torch.randn(cfg["B"], cfg["Hq"], Nq, cfg["D"], generator=g).to(dev, dt)
            k = torch.randn(cfg["B"], cfg["Hkv"], Nk, cfg["D"], generator=g).to(dev, dt)
            ref = None
            for m in methods:
                row = dict(scenario=scen, Nk=Nk, Nq=Nq, method=m, B=cfg["B"], Hq=cfg["Hq"], Hkv=cfg["Hkv"], D=cfg["D"],
                           dtype=cfg["dtype"], device=devname, threads=torch.get_num_threads() if dev.type == "cpu" else None)
                try:
                    fn = method_fn(m, q, k)
                    mem, out = peak_extra_bytes(fn, dev) if memory else (None, fn())
                    row["ms"] = time_fn(fn, dev, cfg["repeats"], warmup=0 if memory else 1)  # the memory call warmed up
                    row["peak_mb"] = None if mem is None else mem / 2**20
                    out = out.float()
                    if ref is None: ref = out
                    row["max_abs_diff"] = float((out - ref).abs().max()) if out.numel() else 0.0
                    row["status"] = "ok"
                    del out
                except torch.OutOfMemoryError:
                    row.update(ms=None, peak_mb=None, max_abs_diff=None, status="OOM")
                    if dev.type == "cuda": torch.cuda.empty_cache()
                if m in ("triton", "torch"):
                    c = cost_model(cfg["B"], cfg["Hq"], cfg["Hkv"], Nq, Nk, cfg["D"], q.element_size())
                    row.update(flops=c["flops"], floor_bytes=c["floor_bytes"], tiled_bytes=c["tiled_bytes"])
                    if tflops and gbps and row["ms"]:
                        floor = max(c["flops"] / (tflops * 1e12), c["floor_bytes"] / (gbps * 1e9)) * 1e3
                        row.update(floor_ms=floor, over_floor=row["ms"] / floor,
                                   achieved_tflops=c["flops"] / (row["ms"] * 1e-3) / 1e12)
                rows.append(row)
                progress(_fmt_row(row))
            del q, k, ref
    _add_ratios(rows)
    return rows


def _add_ratios(rows):
    "speedup_vs_<baseline> = baseline ms / method ms, for the fast paths, measured in the same run."
    idx = {(r["scenario"], r["Nk"], r["method"]): r for r in rows}
    for r in rows:
        if r["method"] not in ("triton", "torch") or not r.get("ms"): continue
        for base in ("eager", "recompute"):
            b = idx.get((r["scenario"], r["Nk"], base))
            if b and b.get("ms"):
                r[f"speedup_vs_{base}"] = b["ms"] / r["ms"]
                if r.get("peak_mb") and b.get("peak_mb"): r[f"memory_ratio_vs_{base}"] = b["peak_mb"] / max(r["peak_mb"], 1e-3)


def _fmt_row(r):
    f = lambda v, s: "-" if v is None else format(v, s)
    return (f"{r['scenario']:7s} Nk={r['Nk']:6d} Nq={r['Nq']:6d} {r['method']:10s} {r['status']:4s} "
            f"{f(r.get('ms'), '10.3f')} ms  {f(r.get('peak_mb'), '9.1f')} MB  diff={f(r.get('max_abs_diff'), '.2e')}")


def table(rows):
    "A printable table with the ratios."
    cols = ["scenario", "Nk", "Nq", "method", "status", "ms", "peak_mb", "speedup_vs_eager", "speedup_vs_recompute",
            "memory_ratio_vs_eager", "over_floor", "achieved_tflops", "max_abs_diff"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["  ".join(f"{c:>12s}" for c in cols)]
    for r in rows: lines.append("  ".join(f"{fmt(r.get(c)):>12s}" for c in cols))
    return "\n".join(lines)


def sweep_blocks(nk=8192, dtype="bfloat16", B=1, Hq=32, Hkv=8, D=128, repeats=20, seed=0):
    "Time the two kernel passes over a grid of tile sizes / warps (CUDA); returns rows."
    dev = torch.device("cuda"); dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, nk, D, generator=g).to(dev, dt); k = torch.randn(B, Hkv, nk, D, generator=g).to(dev, dt)
    W = A._expand_weights(None, B, Hq, nk, dev); G = Hq // Hkv; sc = D**-0.5
    lse = A._triton_lse(q, k, True, sc, G)
    rows = []
    for bm in (32, 64, 128):
        for bn in (32, 64, 128):
            for nw in (4, 8):
                r = dict(block_m=bm, block_n=bn, num_warps=nw)
                try:
                    r["lse_ms"] = time_fn(lambda: A._triton_lse(q, k, True, sc, G, block_m=bm, block_n=bn, num_warps=nw), dev, repeats)
                    r["scores_ms"] = time_fn(lambda: A._triton_importance(q, k, W, lse, True, sc, G, True, block_m=bm,
                                                                          block_n=bn, num_warps=nw), dev, repeats)
                except Exception as e:  # e.g. out of shared memory for a large tile
                    r["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(r); print(r)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    ap.add_argument("--nk", help="comma-separated key counts")
    ap.add_argument("--scenarios", help="comma-separated: h2o,window")
    ap.add_argument("--methods", help="comma-separated: triton,torch,eager,recompute")
    ap.add_argument("--dtype"); ap.add_argument("--window", type=int); ap.add_argument("--repeats", type=int)
    ap.add_argument("--heads", help="Hq,Hkv e.g. 32,8"); ap.add_argument("--head-dim", type=int)
    ap.add_argument("--peak-tflops", type=float); ap.add_argument("--peak-gbps", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--sweep-blocks", action="store_true", help="time kernel tile sizes instead (CUDA)")
    a = ap.parse_args(argv)
    if a.sweep_blocks:
        rows = sweep_blocks()
    else:
        hq, hkv = (map(int, a.heads.split(","))) if a.heads else (None, None)
        rows = run(a.profile, nks=[int(x) for x in a.nk.split(",")] if a.nk else None,
                   scenarios=a.scenarios.split(",") if a.scenarios else None,
                   methods=a.methods.split(",") if a.methods else None, dtype=a.dtype, Hq=hq, Hkv=hkv, D=a.head_dim,
                   window=a.window, repeats=a.repeats, seed=a.seed, peak_tflops=a.peak_tflops, peak_gbps=a.peak_gbps)
        print(); print(table(rows))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
