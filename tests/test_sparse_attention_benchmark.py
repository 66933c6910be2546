"""The sparse decode attention benchmark (scripts/bench_sparse_attention.py) and its report template
(nbs/experiments/sparse_attention_benchmark.ipynb): the shape-derived memory model against direct counts, the break-even
fit against a known line, and an end-to-end template run with tiny sizes."""
import importlib.util, json, math
import pytest
import torch

from conftest import ROOT, reads_as_report


def bench():
    spec = importlib.util.spec_from_file_location("bench_sparse_attention", ROOT/"scripts"/"bench_sparse_attention.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_memory_model_counts_the_tensors():
    "The torch path's materialized bytes equal the sizes of the tensors it builds (gathered rows, positions, mask, logits, probs)."
    b = bench()
    B, Hq, Hkv, N, K, D = 2, 8, 2, 300, 37, 16
    for dt in (torch.float32, torch.bfloat16):
        k = torch.randn(B, Hkv, N, D).to(dt)
        idx = torch.randint(0, N, (B, Hkv, K))
        bi, hk = torch.arange(B)[:, None, None], torch.arange(Hkv)[None, :, None]
        ks = k[bi, hk, idx]                       # the gather copy, input dtype
        parts = [ks, ks] + ([ks.float(), ks.float()] if dt != torch.float32 else [])  # K and V (+ fp32 casts)
        parts += [idx.long(), idx >= 0, torch.zeros(B, Hq, K), torch.zeros(B, Hq, K)]
        want = sum(t.numel() * t.element_size() for t in parts)
        read, extra = b.memory_model("torch", B, Hq, Hkv, N, K, D, k.element_size())
        assert extra == want and read == 2 * B * Hkv * K * D * k.element_size()
    read, extra = b.memory_model("dense", B, Hq, Hkv, N, N, D, 4)
    assert read == 2 * B * Hkv * N * D * 4 and extra == 2 * B * Hq * N * 4
    # the Triton path keeps only split-K partials: far less than the torch path's copy once K is large
    assert b.memory_model("triton", 1, 32, 8, 32768, 3277, 128, 2)[1] < b.memory_model("torch", 1, 32, 8, 32768, 3277, 128, 2)[1] / 10
    with pytest.raises(ValueError, match="unknown method"): b.memory_model("flash", B, Hq, Hkv, N, K, D, 4)


def test_triton_splits_matches_the_kernel_rule():
    "The split count the memory model assumes is the one the kernel launches with."
    b = bench()
    from tokexp.kernels import sparse as S
    if S.triton is None: pytest.skip("triton not installed")
    for B, Hi, K in [(1, 8, 41), (1, 8, 3277), (2, 4, 10_000), (1, 1, 1), (4, 32, 64)]:
        s = S._auto_splits(B, Hi, K, 64)
        per = S.triton.cdiv(S.triton.cdiv(max(K, 1), s), 64) * 64
        assert b.triton_splits(B, Hi, K) == max(1, S.triton.cdiv(K, per)), (B, Hi, K)


def test_breakeven_of_a_known_line():
    "time = 1 + 0.01·K ms against dense 11 ms breaks even at K = 1000 (10 % of N = 10 000); a flat faster line never does."
    b = bench()
    N = 10_000
    rows = [dict(N=N, K=N, method="dense", ms=11.0)] + [dict(N=N, K=k, method="torch", ms=1 + 0.01 * k) for k in (100, 200, 500)]
    f, ext = b.breakeven(rows, "torch")[N]
    assert math.isclose(f, 0.1, rel_tol=1e-9) and ext  # outside the measured 1-5 %: extrapolated
    rows += [dict(N=N, K=2000, method="torch", ms=21.0)]
    f, ext = b.breakeven(rows, "torch")[N]
    assert math.isclose(f, 0.1, rel_tol=1e-9) and not ext
    flat = [dict(N=N, K=N, method="dense", ms=11.0)] + [dict(N=N, K=k, method="torch", ms=2.0) for k in (100, 200)]
    assert b.breakeven(flat, "torch")[N] == (math.inf, True)


def test_run_rows_and_correctness():
    "A tiny run: one dense row per N, a row per (N, fraction, method), sparse outputs equal masked dense attention."
    b = bench()
    n0 = torch.get_num_threads()
    try:
        rows = b.run("cpu", ns=[64, 128], fracs=[0.1, 0.5], Hq=4, Hkv=2, D=16, repeats=1, threads=1, progress=lambda s: None)
    finally:
        torch.set_num_threads(n0)
    assert [(r["N"], r["method"]) for r in rows if r["method"] == "dense"] == [(64, "dense"), (128, "dense")]
    sp = [r for r in rows if r["method"] == "torch"]
    assert sorted((r["N"], r["K"]) for r in sp) == [(64, 6), (64, 32), (128, 13), (128, 64)]
    for r in sp:
        assert r["max_abs_diff"] < 1e-5 and r["full_max_abs_diff"] < 1e-5 and r["ms"] > 0 and r["speedup_vs_dense"] > 0
        assert r["clock"] == "thread_cpu"


def test_template_reads_as_report(reports_tmp):
    from tokexp.report import run_experiment
    r = run_experiment("sparse_attention_benchmark", dict(ns=[256, 512], fracs=[0.05, 0.2], repeats=1, heads=[4, 2], head_dim=32),
                       force=True, progress=False)
    assert r.ok, r.error
    reads_as_report(r.path/"sparse_attention_benchmark.ipynb")
    m = json.loads((r.path/"metrics.json").read_text())
    assert m["fast_path"] == "torch" and m["max_n"] == 512 and m["fractions"] == [0.05, 0.2]
    assert m["max_abs_diff"] < 1e-5 and m["torch_full_selection_max_abs_diff"] < 1e-5
    assert m["torch_speedup_at_max_n_min_frac"] > 0 and "torch_speedup_at_max_n_min_frac" in m["_schema"]
    for f in ("time_vs_n.png", "speedup_heatmap.png", "memory.png", "results.csv"): assert (r.path/f).exists(), f
