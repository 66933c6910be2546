"""Attention-importance kernel vs a float64 reference (Triton runs in the CPU interpreter here).

TRITON_INTERPRET=1 must be in the environment before triton is first imported, so it is set at the very top. If some
other module imported triton earlier in this pytest process (compiled mode, no GPU), the kernel tests are re-run in a
fresh subprocess by `test_kernel_suite_in_fresh_process` instead of being silently skipped.
"""
import os
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess, sys
import pytest
import torch

from tokexp.core import InputError, ConfigError
from tokexp.kernels import attention as A
from tokexp.kernels.attention import (attention_importance, attention_importance_torch, query_lse,
                                      h2o_weights, window_weights, last_query_weights, a2sf_weights)

KERNEL_OK = A._triton_ready(torch.zeros(1, 1, 1, 16)) is None
kernel = pytest.mark.skipif(not KERNEL_OK, reason="triton imported without TRITON_INTERPRET=1 in this process: "
                                                  "covered by test_kernel_suite_in_fresh_process")

SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; the seed is in every failure message
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=2e-3, atol=2e-4)}


def _weights(scheme, B, Hq, nq, g):
    return {"h2o": lambda: h2o_weights(nq), "window": lambda: window_weights(nq, 4),
            "last": lambda: last_query_weights(nq), "a2sf": lambda: a2sf_weights(nq, 0.9),
            "batch": lambda: torch.rand(B, nq, generator=g), "head": lambda: torch.rand(B, Hq, nq, generator=g)}[scheme]()


def _inputs(seed, B, Hq, Hkv, Nq, Nk, D, dtype, scale_q=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Nq, D, generator=g) * scale_q).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    return q, k, g


def _check(got, ref, dtype, what):
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype} (seed {SEED})"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries, e.g. unwritten poisoned outputs (seed {SEED})"
    torch.testing.assert_close(got.double(), ref, **TOL[dtype], msg=lambda m: f"{what} (seed {SEED}): {m}")


# (B, Hq, Hkv, Nq, Nk, D, causal, dtype, weights, group_reduce, supplied lse)
CASES = [
    (1, 1, 1, 1, 1, 16, True, torch.float32, "h2o", "sum", False),         # a single key
    (1, 2, 1, 1, 1, 24, False, torch.float32, "last", "none", True),
    (2, 2, 2, 17, 17, 24, True, torch.float32, "h2o", "sum", False),       # prefill, odd sizes, G=1
    (1, 4, 2, 17, 17, 16, True, torch.bfloat16, "a2sf", "none", False),    # G=2, bf16
    (1, 4, 1, 5, 130, 64, True, torch.float32, "window", "sum", True),     # decode window, G=4
    (2, 8, 1, 3, 130, 16, True, torch.bfloat16, "last", "sum", True),      # G=8, last query, bf16
    (1, 8, 1, 33, 130, 24, False, torch.float32, "a2sf", "none", False),   # non-causal, G=8
    (1, 4, 2, 33, 47, 64, True, torch.float32, "batch", "sum", False),     # [B, Nq] weights
    (2, 4, 4, 20, 37, 24, False, torch.bfloat16, "head", "sum", True),     # [B, Hq, Nq] weights, non-causal, bf16
    (1, 2, 1, 130, 130, 16, True, torch.float32, "h2o", "sum", False),     # many query tiles per key block
    (1, 8, 2, 1, 130, 64, True, torch.bfloat16, "h2o", "none", False),     # decode step (Nq=1), G=4
    (1, 2, 2, 7, 3, 16, False, torch.float32, "window", "none", False),    # cross attention, Nq > Nk
]


@kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_Nq{}_Nk{}_D{}_{}_{}_{}_{}_{}".format(
    *c[:6], "causal" if c[6] else "full", str(c[7]).split(".")[-1], c[8], c[9], "lse" if c[10] else "nolse"))
def test_kernel_matches_float64_reference(case):
    B, Hq, Hkv, Nq, Nk, D, causal, dtype, scheme, reduce, give_lse = case
    q, k, g = _inputs(SEED + CASES.index(case), B, Hq, Hkv, Nq, Nk, D, dtype)
    w = _weights(scheme, B, Hq, Nq, g)
    q64, k64 = q.double(), k.double()
    ref = attention_importance_torch(q64, k64, w, causal=causal, group_reduce=reduce)
    lse_ref = torch.logsumexp(_logits64(q64, k64, causal), -1)
    what = f"case {case}"
    # pass 1 alone, into a NaN-poisoned buffer
    lse = torch.full((B, Hq, Nq), float("nan"))
    A._triton_lse(q, k, causal, D**-0.5, Hq // Hkv, out=lse, block_m=16, block_n=16)
    _check(lse, lse_ref, dtype, what + " lse")
    # pass 2 into a NaN-poisoned view of a larger buffer: every element written, nothing written outside
    Ho = Hkv if reduce == "sum" else Hq
    big = torch.full((B, Ho, Nk + 3), float("nan"))
    out = big[:, :, 1:Nk + 1]
    got = attention_importance(q, k, w, causal=causal, group_reduce=reduce, impl="triton",
                               lse=lse_ref.float() if give_lse else None, out=out)
    assert got.data_ptr() == out.data_ptr()
    _check(out, ref, dtype, what)
    assert torch.isnan(big[:, :, 0]).all() and torch.isnan(big[:, :, Nk + 1:]).all(), f"{what}: wrote outside out (seed {SEED})"
    # the chunked torch path agrees too
    _check(attention_importance(q, k, w, causal=causal, group_reduce=reduce, impl="torch",
                                lse=lse_ref.float() if give_lse else None), ref, dtype, what + " torch path")


def _logits64(q, k, causal):
    G = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal: s = s.masked_fill(~A._causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return s


@kernel
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 64)])
def test_tile_shapes_and_causal_skipping(block):
    # block_m != block_n moves the causal diagonal across tile boundaries; the skipped tiles must hold no mass
    q, k, _ = _inputs(SEED + block[0] + block[1], 1, 4, 2, 45, 77, 24, torch.float32)
    w = a2sf_weights(45, 0.95)
    ref = attention_importance_torch(q.double(), k.double(), w)
    lse = A._triton_lse(q, k, True, 24**-0.5, 2, block_m=block[0], block_n=block[1])
    out = torch.full((1, 2, 77), float("nan"))
    A._triton_importance(q, k, A._expand_weights(w, 1, 4, 45, "cpu"), lse, True, 24**-0.5, 2, True, out=out,
                         block_m=block[0], block_n=block[1])
    _check(out, ref, torch.float32, f"blocks {block}")


@kernel
def test_peaked_logits_are_stable():
    # large logits (scale=1, |q·k| ~ 30): the online softmax must not overflow; scores still sum to the weight mass
    q, k, _ = _inputs(SEED + 7, 1, 2, 1, 19, 40, 64, torch.float32, scale_q=4.0)
    ref = attention_importance_torch(q.double(), k.double(), scale=1.0)
    got = attention_importance(q, k, scale=1.0, impl="triton")
    _check(got, ref, torch.float32, "peaked logits")
    torch.testing.assert_close(got.sum(-1), torch.full((1, 1), 2 * 19.0), rtol=1e-4, atol=1e-4)


@kernel
def test_query_lse_and_non_contiguous_inputs():
    q, k, _ = _inputs(SEED + 11, 2, 4, 2, 9, 30, 16, torch.float32)
    qv = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Nq, D] with head stride != Nq*D
    kv = torch.cat([k, k], -1)[..., :16]                  # row stride 32
    assert not qv.is_contiguous() and not kv.is_contiguous()
    ref = torch.logsumexp(_logits64(q.double(), k.double(), True), -1)
    _check(query_lse(qv, kv, impl="triton"), ref, torch.float32, "query_lse triton")
    _check(query_lse(qv, kv, impl="torch"), ref, torch.float32, "query_lse torch")
    _check(attention_importance(qv, kv, impl="triton"), attention_importance_torch(q.double(), k.double()),
           torch.float32, "non-contiguous")


@pytest.mark.parametrize("chunk_elems", [1, 50, 1 << 22])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_torch_path_matches_reference(monkeypatch, chunk_elems, G):
    monkeypatch.setattr(A, "TORCH_CHUNK_ELEMENTS", chunk_elems)  # 1 -> one query per chunk
    q, k, g = _inputs(SEED + G, 2, 2 * G, 2, 11, 29, 24, torch.float64)
    w = torch.rand(2, 11, generator=g, dtype=torch.float64)
    for causal in (True, False):
        for reduce in ("sum", "none"):
            got = attention_importance(q, k, w, causal=causal, group_reduce=reduce, impl="torch")
            ref = attention_importance_torch(q, k, w, causal=causal, group_reduce=reduce)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"seed {SEED}: {m}")


def test_reference_definition_by_hand():
    # one head, three keys, two queries (the last two positions): explicit softmax rows
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 1.0], [0.0, 1.0], [2.0, 0.0]]]], dtype=torch.float64)
    r1 = torch.softmax(torch.tensor([1.0, 0.0]) / 2**0.5, 0)       # query 0 sees keys 0, 1
    r2 = torch.softmax(torch.tensor([2.0, 2.0, 0.0]) / 2**0.5, 0)  # query 1 sees keys 0..2
    want = 0.5 * torch.cat([r1, torch.zeros(1)]) + 2.0 * r2
    got = attention_importance_torch(q, k, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(got[0, 0], want.double())
    torch.testing.assert_close(attention_importance(q, k, torch.tensor([0.5, 2.0]))[0, 0], want.double())


def test_group_sum_equals_per_head_sum():
    q, k, _ = _inputs(SEED + 3, 1, 8, 2, 6, 10, 16, torch.float32)
    per_head = attention_importance(q, k, group_reduce="none")
    torch.testing.assert_close(attention_importance(q, k), per_head.view(1, 2, 4, 10).sum(2))


def test_bad_inputs():
    q, k = torch.randn(1, 6, 4, 16), torch.randn(1, 4, 9, 16)
    with pytest.raises(InputError, match="Hq=6 .* Hkv=4"): attention_importance(q, k)
    with pytest.raises(InputError, match="Hq=6 .* Hkv=4"): attention_importance_torch(q, k)
    with pytest.raises(InputError, match="Hq=6 .* Hkv=4"): query_lse(q, k)
    k = torch.randn(1, 2, 9, 16)
    with pytest.raises(InputError, match="same dtype"): attention_importance(q, k.bfloat16())
    with pytest.raises(InputError, match="head_dim"): attention_importance(q, torch.randn(1, 2, 9, 8))
    with pytest.raises(InputError, match="batch size"): attention_importance(q, torch.randn(2, 2, 9, 16))
    with pytest.raises(InputError, match="4-D"): attention_importance(q[0], k)
    with pytest.raises(InputError, match="float tensor"): attention_importance(q.long(), k.long())
    with pytest.raises(InputError, match="Nq <= Nk"): attention_importance(torch.randn(1, 2, 10, 16), k)
    with pytest.raises(InputError, match="w must have shape"): attention_importance(q, k, torch.ones(5))
    with pytest.raises(InputError, match="w must have shape"): attention_importance(q, k, torch.ones(1, 2, 4))
    with pytest.raises(InputError, match="lse must be"): attention_importance(q, k, lse=torch.zeros(1, 6, 5))
    with pytest.raises(InputError, match="out must be"): attention_importance(q, k, out=torch.zeros(1, 6, 9))
    with pytest.raises(InputError, match="group_reduce"): attention_importance(q, k, group_reduce="mean")
    with pytest.raises(InputError, match="impl"): attention_importance(q, k, impl="cuda")
    with pytest.raises(InputError, match="window"): window_weights(4, -1)
    with pytest.raises(InputError, match="alpha"): a2sf_weights(4, 2.0)


def test_weight_schemes_shapes_and_mass():
    for nq in (1, 5, 16):
        for w, mass in ((h2o_weights(nq), nq), (window_weights(nq, 4), min(4, nq)), (last_query_weights(nq), 1)):
            assert w.shape == (nq,) and w.dtype == torch.float32 and float(w.sum()) == mass
        a = a2sf_weights(nq, 0.5)
        assert float(a[-1]) == 1.0 and torch.all(a[1:] >= a[:-1])


@pytest.mark.skipif(KERNEL_OK, reason="the kernel tests already ran in this process")
def test_kernel_suite_in_fresh_process():
    # triton was imported in compiled mode before this module (and there is no GPU): run the kernel tests in a child
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                        "-k", "not ahead_of_time"],  # the AOT compile test does not need the interpreter: it ran here
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "skipped" not in r.stdout.splitlines()[-1] or "1 skipped" in r.stdout.splitlines()[-1], r.stdout[-2000:]


AOT = r'''
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tokexp.kernels import attention as A
assert not A._interpreting()
lse_k, imp_k = A._kernels()
PTR = {"Q": "*{dt}", "K": "*{dt}", "LSE": "*fp32", "W": "*fp32", "OUT": "*fp32", "qk_scale": "fp32"}
CONFIGS = [(torch.bfloat16, "bf16", 128, 4096, True), (torch.bfloat16, "bf16", 64, 1, True),
           (torch.bfloat16, "bf16", 256, 512, False), (torch.float16, "fp16", 80, 64, False),
           (torch.float32, "fp32", 128, 4096, True)]
for tdt, dt, D, Nq, causal in CONFIGS:
        prec, upcast = A._precision(torch.zeros(1, dtype=tdt))
        for fn, which in ((lse_k, "lse"), (imp_k, "scores")):
            bm, bn, bd = A._blocks(D, Nq, tdt, which, None, None)
            consts = dict(D=D, CAUSAL=causal, PREC=prec, UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
            sig = {n: "constexpr" if n in consts else PTR.get(n, "i32").format(dt=dt) for n in fn.arg_names}
            src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
            assert len(c.asm["cubin"]) > 0
            print(dt, D, Nq, causal, which, bm, bn, "ok")
'''


def test_kernels_compile_for_sm90_ahead_of_time():
    # the interpreter is lenient about types; compiling for a real target (no GPU needed) checks the compiled front end
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert r.stdout.count(" ok") == 10, r.stdout
