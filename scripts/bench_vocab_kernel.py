#!/usr/bin/env python3
"""Benchmark: streaming vocab statistics vs torch eager, side by side in one run (issue 5).

For each vocabulary size V and number of rows N (= B·T) it times, on the same logits:
  eager    torch eager over the full [N, V] tensor: log_softmax (fp32) + gather + rank by comparison + entropy + moments
           + max log p + top-p mass, i.e. the same eight fields as `VocabStats`
  chunked  `vocab_stats_torch` (the reference path used on CPU: log-softmax materialized for a few rows at a time)
  triton   `vocab_stats_triton`, the streaming kernel (CUDA only)
and reports the median time, the peak *extra* memory (beyond the logits and targets), ratios against eager, the
largest absolute error over the float fields and the fraction of equal ranks against a reference (float64 torch on
CPU, float32 torch on CUDA; in --hidden mode the reference recomputes the logits, so near-ties may rank differently).
With --hidden D the inputs are hidden states [N, D] and an LM-head weight [V, D] instead: eager = `h @ W.T` then the
eager statistics, chunked = `vocab_stats_from_hidden_torch`, triton = the fused `vocab_stats_from_hidden_triton`.

Memory: on CUDA, `torch.cuda.max_memory_allocated` minus the allocation before the call. On CPU, the peak of live
tensor bytes at op granularity from `torch.profiler` memory events (allocations attributed to each top-level op, frees
as they happen); transient allocations inside a single op are not seen, so CPU peaks are a lower bound.

Usage:
  .venv/bin/python scripts/bench_vocab_kernel.py                 # CPU: torch paths only, small N
  python scripts/bench_vocab_kernel.py --device cuda              # GPU: adds the Triton kernel (needs a CUDA torch)
  ... --save                                                      # also write reports/benchmarks/vocab_kernel-<device>.json
  TRITON_INTERPRET=1 .venv/bin/python scripts/bench_vocab_kernel.py --vocab 1000 --rows 8   # dry run of the kernel path on CPU
No GPU was available when this script was written: the kernels were checked in Triton's interpreter and compiled
ahead of time for sm80/sm90 (tests/test_kernels_vocab.py); run this script on a GPU machine to get kernel numbers.
"""
import argparse, json, math, os, statistics, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tokexp.kernels.vocab import (vocab_stats_torch, vocab_stats_triton, vocab_stats_from_hidden_torch,  # noqa: E402
                                  vocab_stats_from_hidden_triton, HAS_TRITON)


def eager_stats(x, t):
    "Plain torch eager over the whole [N, V] tensor (the baseline the kernel replaces)."
    lp = torch.log_softmax(x.float(), -1)
    xt = x.gather(-1, t[:, None])
    logp = lp.gather(-1, t[:, None])[:, 0]
    rank = (x > xt).sum(-1) + 1
    p = lp.exp()
    mean = (p * lp).sum(-1)
    e2 = (p * lp.square()).sum(-1)
    mass = (p * (x >= xt)).sum(-1)
    lse = torch.logsumexp(x.float(), -1)
    return lse, logp, rank, -mean, lp.amax(-1), mass, mean, e2 - mean.square()


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def time_one(fn, dev):
    "Wall time of one call in ms (CUDA events on GPU)."
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(dev)
        return a.elapsed_time(b)
    t0 = time.perf_counter(); fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns, dev, repeat, warmup=1):
    "Median ms per method, the methods taking turns in each round so that load changes hit them all alike."
    for fn in fns.values():
        for _ in range(warmup): fn()
    sync(dev)
    ts = {m: [] for m in fns}
    for _ in range(repeat):
        for m, fn in fns.items(): ts[m].append(time_one(fn, dev))
    return {m: statistics.median(v) for m, v in ts.items()}


def peak_extra_bytes(fn, dev):
    "Peak memory allocated by `fn` beyond what was live before it (see module docstring)."
    if dev.type == "cuda":
        sync(dev); torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn(); sync(dev); del out
        return torch.cuda.max_memory_allocated(dev) - base
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(); del out
    evs = sorted((e for e in prof.events() if e.cpu_parent is None),
                 key=lambda e: e.time_range.start if e.name == "[memory]" else e.time_range.end)
    cur = peak = 0
    for e in evs:
        cur += e.cpu_memory_usage; peak = max(peak, cur)
    return peak


def max_err(a, b):
    "Largest absolute difference over the float fields, and the fraction of positions whose rank agrees."
    errs = [float((x.double() - y.double()).abs().max()) for i, (x, y) in enumerate(zip(a, b)) if i != 2]
    return max(errs), float((a[2].long() == b[2].long()).double().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--vocab", default="32000,128256,152064", help="comma-separated vocabulary sizes")
    ap.add_argument("--rows", default=None, help="comma-separated N = B·T (default: CPU 64,512; CUDA 512,4096,16384)")
    ap.add_argument("--dtype", default=None, help="logits dtype: float32, bfloat16, float16 (default: CPU float32, CUDA bfloat16)")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats per measurement (default: CPU 3, CUDA 20)")
    ap.add_argument("--hidden", type=int, default=0, help="benchmark the fused LM-head path with this hidden size (0: logits input)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager baseline (e.g. when it does not fit)")
    ap.add_argument("--save", action="store_true", help="write the results to reports/benchmarks/vocab_kernel-<device>.json")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is steadier on a busy machine)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    cuda = dev.type == "cuda"
    rows = [int(r) for r in (a.rows or ("512,4096,16384" if cuda else "64,512")).split(",")]
    vocab = [int(v) for v in a.vocab.split(",")]
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    repeat = a.repeat or (20 if cuda else 3)
    # on CPU the kernel runs only in Triton's interpreter (TRITON_INTERPRET=1): a dry run of the script, not a timing
    use_triton = HAS_TRITON and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(("fused LM head, hidden size %d  " % a.hidden if a.hidden else "") + f"device {name}  dtype {str(dtype).removeprefix('torch.')}  torch {torch.__version__}  threads {torch.get_num_threads()}"
          f"  methods: {'eager, ' if not a.no_eager else ''}chunked{', triton' if use_triton else ''}"
          + ("" if cuda else "  (CPU: torch paths only; the Triton kernel needs a GPU)" if not use_triton
             else "  (CPU: Triton in the interpreter: a dry run, timings meaningless)"))
    g = torch.Generator(device=dev).manual_seed(a.seed)
    results = []
    hdr = f"{'V':>7} {'N':>6} | {'method':8} {'ms':>9} {'peak MiB':>9} {'x eager':>8} {'mem/eager':>9} {'max|err|':>9} rank=ref"
    print(hdr); print("-" * len(hdr))
    for V in vocab:
        for N in rows:
            t = torch.randint(0, V, (N,), generator=g, device=dev)
            methods = {}
            if a.hidden:
                D = a.hidden
                h = torch.randn(N, D, generator=g, device=dev).to(dtype)
                W = (torch.randn(V, D, generator=g, device=dev) * (4 / math.sqrt(D))).to(dtype)
                x = h  # for the size column
                if not a.no_eager: methods["eager"] = lambda: eager_stats(h @ W.T, t)
                methods["chunked"] = lambda: tuple(vocab_stats_from_hidden_torch(h, W, t).as_dict().values())
                if use_triton: methods["triton"] = lambda: tuple(vocab_stats_from_hidden_triton(h, W, t).as_dict().values())
                reference = lambda: vocab_stats_from_hidden_torch(h, W, t, dtype=torch.float32 if cuda else torch.float64)
            else:
                x = (torch.randn(N, V, generator=g, device=dev) * 4).to(dtype)
                if not a.no_eager: methods["eager"] = lambda: eager_stats(x, t)
                methods["chunked"] = lambda: tuple(vocab_stats_torch(x, t).as_dict().values())
                if use_triton: methods["triton"] = lambda: tuple(vocab_stats_triton(x, t).as_dict().values())
                reference = lambda: vocab_stats_torch(x, t, dtype=torch.float32 if cuda else torch.float64)
            ref = None
            row = {"V": V, "N": N, "hidden": a.hidden, "dtype": str(dtype).removeprefix("torch."), "device": name,
                   "input_MiB": x.numel() * x.element_size() / 2**20}
            ok = {}
            for m, fn in methods.items():  # correctness and memory first, one method at a time
                try:
                    out = fn()
                    ref = ref or tuple(reference().as_dict().values())
                    err, rank_ok = max_err(out, ref)
                    del out
                    mem = peak_extra_bytes(fn, dev)
                    row[m] = {"peak_extra_MiB": mem / 2**20, "max_abs_err": err, "rank_agree": rank_ok}
                    ok[m] = fn
                except torch.OutOfMemoryError:
                    row[m] = {"ms": None, "peak_extra_MiB": None, "error": "out of memory"}
                    if cuda: torch.cuda.empty_cache()
            for m, ms in time_interleaved(ok, dev, repeat).items(): row[m]["ms"] = ms
            base = row.get("eager", {})
            for m in methods:
                r = row[m]
                if r.get("ms") is not None and base.get("ms"):
                    r["speedup_vs_eager"] = base["ms"] / r["ms"]
                    r["mem_ratio_vs_eager"] = r["peak_extra_MiB"] / base["peak_extra_MiB"] if base["peak_extra_MiB"] else None
                if r.get("ms") is None:
                    print(f"{V:>7} {N:>6} | {m:8} {'OOM':>9}")
                    continue
                sp = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
                mr = f"{r['mem_ratio_vs_eager']:.4f}" if r.get("mem_ratio_vs_eager") is not None else "-"
                print(f"{V:>7} {N:>6} | {m:8} {r['ms']:>9.2f} {r['peak_extra_MiB']:>9.2f} {sp:>8} {mr:>9} {r['max_abs_err']:>9.1e} {r['rank_agree']:.4f}")
            results.append(row)
            del x, t, methods
            if a.hidden: del h, W
            if cuda: torch.cuda.empty_cache()
    if a.save:
        from tokexp.core import write_json, environment_info
        out = ROOT / "reports" / "benchmarks" / f"vocab_kernel{'-hidden' if a.hidden else ''}-{'cuda' if cuda else 'cpu'}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"benchmark": "vocab_kernel", "env": environment_info(), "repeat": repeat, "results": results})
        print(f"saved {out.relative_to(ROOT)}")
    return results


if __name__ == "__main__":
    main()
