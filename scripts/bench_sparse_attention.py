#!/usr/bin/env python3
"""Benchmark: sparse decode attention over a selected index set vs dense decode attention over the whole cache (issue 17).

One decode step (one query per head, GQA: Hq query heads over Hkv KV heads) over a cache of N keys; the sparse methods
attend to a fraction `frac` of the positions (random distinct positions per KV head, shared by the group's query heads).
Methods:
  dense     dense attention over all N keys, the faster of torch `scaled_dot_product_attention(enable_gqa=True)` and a
            grouped matmul (q viewed as [B, Hkv, G, D] against K once, softmax, @ V) — the baseline
  torch     `sparse_decode_attention(impl="torch")`: gathers the selected K/V rows, fp32 softmax (materializes K rows)
  triton    `sparse_decode_attention(impl="triton")`: gather + online softmax inside the kernel, split-K merge (CUDA only)
Reported: median time per call (ms), speedup over dense, max abs difference to dense attention with the other keys
masked out (a correctness check at benchmark sizes).

Usage:
  .venv/bin/python scripts/bench_sparse_attention.py                 # CPU: dense vs torch path, N 4k..32k, 1..10 %
  python scripts/bench_sparse_attention.py --profile gpu             # GPU: adds the Triton kernel, bf16
  ... --n 4096,32768 --frac 0.01,0.1 --json out.json
No GPU was lent while this was written: the CUDA numbers have not been measured; the kernel is tested in the interpreter.
"""
import argparse, json, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from tokexp.kernels.sparse import sparse_decode_attention  # noqa: E402

PROFILES = {
    "cpu": dict(device="cpu", dtype="float32", B=1, Hq=32, Hkv=8, D=128, ns=[4096, 8192, 16384, 32768],
                fracs=[0.01, 0.02, 0.05, 0.1], methods=["dense", "torch"], repeats=7, threads=1),
    "gpu": dict(device="cuda", dtype="bfloat16", B=1, Hq=32, Hkv=8, D=128, ns=[4096, 8192, 16384, 32768],
                fracs=[0.01, 0.02, 0.05, 0.1], methods=["dense", "torch", "triton"], repeats=50, threads=None),
}


def timed(fn, repeats, device):
    "Median seconds of `fn()` over `repeats` calls after one warm-up."
    fn()
    ts = []
    for _ in range(repeats):
        if device == "cuda": torch.cuda.synchronize()
        t = time.perf_counter(); fn()
        if device == "cuda": torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--n", help="comma-separated cache lengths")
    ap.add_argument("--frac", help="comma-separated selected fractions")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    P = dict(PROFILES[a.profile])
    if a.n: P["ns"] = [int(x) for x in a.n.split(",")]
    if a.frac: P["fracs"] = [float(x) for x in a.frac.split(",")]
    if a.repeats: P["repeats"] = a.repeats
    if P["device"] == "cuda" and not torch.cuda.is_available(): sys.exit("--profile gpu needs a CUDA device")
    if P["threads"]: torch.set_num_threads(P["threads"])
    dev, dt = P["device"], getattr(torch, P["dtype"])
    B, Hq, Hkv, D = P["B"], P["Hq"], P["Hkv"], P["D"]
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"device={dev} dtype={P['dtype']} B={B} Hq={Hq} Hkv={Hkv} D={D} threads={torch.get_num_threads()}")
    print(f"{'N':>6} {'frac':>5} {'K':>5} {'method':>7} {'ms':>8} {'x dense':>8} {'max|err|':>9}")
    for N in P["ns"]:
        q = torch.randn(B, Hq, 1, D, generator=g).to(dev, dt)
        k = torch.randn(B, Hkv, N, D, generator=g).to(dev, dt)
        v = torch.randn(B, Hkv, N, D, generator=g).to(dev, dt)
        G = Hq // Hkv
        grouped = lambda: (torch.softmax((q.view(B, Hkv, G, D) @ k.transpose(-1, -2)).float() * D ** -0.5, -1).to(dt) @ v).view(B, Hq, 1, D)
        t_dense = min(timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), P["repeats"], dev),
                      timed(grouped, P["repeats"], dev))
        rows.append(dict(N=N, frac=1.0, K=N, method="dense", ms=t_dense * 1e3, speedup=1.0, max_err=0.0))
        print(f"{N:>6} {1.0:>5} {N:>5} {'dense':>7} {t_dense * 1e3:>8.3f} {1.0:>8.2f} {0.0:>9.2e}")
        for frac in P["fracs"]:
            K = max(1, round(frac * N))
            idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K).to(dev)
            mask = torch.zeros(B, Hkv, 1, N, dtype=torch.bool, device=dev).scatter_(-1, idx[:, :, None], True)
            ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(Hq // Hkv, 1), v.float().repeat_interleave(Hq // Hkv, 1),
                                                 attn_mask=mask.repeat_interleave(Hq // Hkv, 1))
            for m in P["methods"]:
                if m == "dense": continue
                fn = lambda: sparse_decode_attention(q, k, v, idx, impl=m)
                t = timed(fn, P["repeats"], dev)
                err = (fn().float() - ref).abs().max().item()
                rows.append(dict(N=N, frac=frac, K=K, method=m, ms=t * 1e3, speedup=t_dense / t, max_err=err))
                print(f"{N:>6} {frac:>5} {K:>5} {m:>7} {t * 1e3:>8.3f} {t_dense / t:>8.2f} {err:>9.2e}")
    if a.json: Path(a.json).write_text(json.dumps(dict(profile=P, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
