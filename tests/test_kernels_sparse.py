"""Sparse decode attention (tokexp.kernels.sparse): Triton kernel (CPU interpreter here) and torch path vs an independent
float64 loop over heads and selected positions, on fresh random inputs with odd sizes.

TRITON_INTERPRET=1 must be in the environment before triton is first imported, so it is set at the very top; if triton
was imported earlier in compiled mode (no GPU), the kernel tests re-run in a fresh subprocess instead of being skipped.
"""
import os
os.environ.setdefault("TRITON_INTERPRET", "1")

import math, subprocess, sys
import pytest
import torch
import torch.nn.functional as F

from tokexp.core import InputError, ConfigError
from tokexp.kernels import sparse as S
from tokexp.kernels.sparse import sparse_decode_attention, sparse_decode_attention_torch

KERNEL_OK = S._triton_ready(torch.zeros(1, 1, 1, 16)) is None
kernel = pytest.mark.skipif(not KERNEL_OK, reason="triton imported without TRITON_INTERPRET=1 in this process: "
                                                  "covered by test_kernel_suite_in_fresh_process")

SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; the seed is in every failure message
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=3e-3, atol=3e-4)}


def loop_reference(q, k, v, idx, scale, valid=None):
    "Independent float64 evaluation: for each batch row and query head, softmax over its distinct selected positions."
    q4 = q if q.dim() == 4 else q[:, :, None]
    B, Hq, _, D = q4.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    Hi = idx.shape[1]
    out = torch.zeros(B, Hq, 1, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            ih = h if Hi == Hq else g
            pos = [int(p) for p in idx[b, ih] if p >= 0 and (valid is None or bool(valid[b, p]))]
            if not pos: continue
            logits = [scale * float(q4[b, h, 0].double() @ k[b, g, p].double()) for p in pos]
            mx = max(logits)
            w = [math.exp(l - mx) for l in logits]
            z = sum(w)
            for wi, p in zip(w, pos): out[b, h, 0] += (wi / z) * v[b, g, p].double()
    return out


def inputs(seed, B, Hq, Hkv, N, D, Dv, K, dtype, per_query=False, holes=0, pad=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    if strided:  # a slice of a larger cache, heads and positions interleaved: non-contiguous views
        kb = torch.randn(B, N + 7, Hkv, D + 3, generator=g).to(dtype)
        vb = torch.randn(B, N + 7, Hkv, Dv + 5, generator=g).to(dtype)
        k, v = kb[:, 3:3 + N, :, :D].transpose(1, 2), vb[:, 2:2 + N, :, 1:1 + Dv].transpose(1, 2)
    else:
        k, v = torch.randn(B, Hkv, N, D, generator=g).to(dtype), torch.randn(B, Hkv, N, Dv, generator=g).to(dtype)
    Hi = Hq if per_query else Hkv
    idx = torch.stack([torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(Hi)]) for _ in range(B)])
    if holes: idx.view(-1)[torch.randperm(idx.numel(), generator=g)[:holes]] = -1
    valid = None
    if pad:
        valid = torch.ones(B, N, dtype=torch.bool)
        valid[:, :pad] = False  # left padding
    return q, k, v, idx, valid


# (B, Hq, Hkv, N, D, Dv, K, dtype, per_query, holes, pad, strided, splits)
CASES = [
    (1, 1, 1, 1, 16, 16, 1, torch.float32, False, 0, 0, False, None),        # a single key
    (1, 4, 2, 37, 24, 24, 37, torch.float32, False, 0, 0, False, None),      # every position
    (2, 6, 2, 131, 24, 20, 13, torch.float32, False, 3, 0, False, None),     # G=3, Dv != D, holes
    (1, 8, 1, 200, 64, 64, 77, torch.bfloat16, False, 0, 5, False, 2),       # G=8, bf16, padding, 2 splits
    (2, 4, 4, 97, 16, 16, 50, torch.float32, True, 4, 0, True, 3),           # per-query-head sets, strided views
    (1, 8, 2, 333, 80, 72, 129, torch.float16, True, 0, 9, True, None),      # per query head, fp16, D=80
    (1, 12, 4, 500, 32, 32, 301, torch.float32, False, 0, 0, True, 5),       # many tiles, 5 splits
    (3, 2, 1, 65, 48, 40, 64, torch.bfloat16, False, 7, 2, False, 1),        # batch 3
]


@kernel
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_float64_loop(case):
    B, Hq, Hkv, N, D, Dv, K, dt, per_q, holes, pad, strided, splits = case
    seed = SEED + hash(case) % 1000
    q, k, v, idx, valid = inputs(seed, B, Hq, Hkv, N, D, Dv, K, dt, per_q, holes, pad, strided)
    scale = 1 / math.sqrt(D)
    ref = loop_reference(q, k, v, idx, scale, valid)
    got = sparse_decode_attention(q, k, v, idx, valid=valid, impl="triton", splits=splits)
    assert got.shape == (B, Hq, 1, Dv) and got.dtype == dt, (got.shape, got.dtype)
    torch.testing.assert_close(got.double(), ref, **TOL[dt], msg=lambda m: f"case {case} (seed {seed}): {m}")
    tor = sparse_decode_attention_torch(q, k, v, idx, valid=valid)
    torch.testing.assert_close(tor.double(), ref, **TOL[dt], msg=lambda m: f"torch path, case {case} (seed {seed}): {m}")


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=kernel)])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_all_indices_equal_dense_attention(impl, G):
    g = torch.Generator().manual_seed(SEED)
    Hkv, N = 2, 97
    q, k, v = torch.randn(2, Hkv * G, 1, 40, generator=g), torch.randn(2, Hkv, N, 40, generator=g), torch.randn(2, Hkv, N, 24, generator=g)
    everything = torch.arange(N).expand(2, Hkv, N)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    torch.testing.assert_close(sparse_decode_attention(q, k, v, everything, impl=impl), dense, rtol=2e-4, atol=2e-5,
                               msg=lambda m: f"seed {SEED}: {m}")
    # the order of the positions does not matter
    shuffled = everything[..., torch.randperm(N, generator=g)]
    torch.testing.assert_close(sparse_decode_attention(q, k, v, shuffled, impl=impl), dense, rtol=2e-4, atol=2e-5)


@kernel
def test_peaked_logits_are_stable():
    # logits ~ 1e3: the online softmax must not overflow; one key dominates
    q = torch.zeros(1, 2, 1, 16); q[..., 0] = 100.0
    k = torch.randn(1, 1, 50, 16) * 0.01; k[0, 0, 31, 0] = 40.0
    v = torch.randn(1, 1, 50, 16)
    idx = torch.tensor([[[3, 31, 7, 49, 0]]])
    for impl in ("torch", "triton"):
        out = sparse_decode_attention(q, k, v, idx, impl=impl, scale=1.0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0, :, 0], v[0, 0, 31].expand(2, 16), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=kernel)])
def test_nothing_to_attend_gives_zeros(impl):
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 10, 16)
    idx = torch.tensor([[[1, 2, 3], [-1, -1, -1]]])
    out = sparse_decode_attention(q, k, k, idx, impl=impl)
    assert out[0, 2:].abs().sum() == 0 and out[0, :2].abs().sum() > 0
    valid = torch.zeros(1, 10, dtype=torch.bool); valid[0, 2] = True
    out = sparse_decode_attention(q, k, k, idx, valid=valid, impl=impl)
    torch.testing.assert_close(out[0, :2, 0], k[0, 0, 2].expand(2, 16))


def test_bad_inputs():
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8)
    idx = torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(InputError, match="Hq=4 must be a positive multiple"): sparse_decode_attention(q, torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8), idx)
    with pytest.raises(InputError, match="idx must be"): sparse_decode_attention(q, k, k, torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(InputError, match="N=10 positions"): sparse_decode_attention(q, k, k, idx + 10)
    with pytest.raises(InputError, match="int32/int64"): sparse_decode_attention(q, k, k, idx.float())
    with pytest.raises(InputError, match="share a dtype"): sparse_decode_attention(q.half(), k, k, idx)
    with pytest.raises(InputError, match="current decode query"): sparse_decode_attention(torch.randn(1, 4, 3, 8), k, k, idx)
    with pytest.raises(InputError, match="impl must be"): sparse_decode_attention(q, k, k, idx, impl="cuda")
    with pytest.raises(InputError, match="valid must be"): sparse_decode_attention(q, k, k, idx, valid=torch.ones(1, 10))
    if not KERNEL_OK:
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"): sparse_decode_attention(q, k, k, idx, impl="triton")


@pytest.mark.skipif(KERNEL_OK, reason="the kernel tests already ran in this process")
def test_kernel_suite_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k", "not ahead_of_time"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


AOT = r'''
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tokexp.kernels import sparse as S
assert not S._interpreting()
fn = S._kernel()
PTR = {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "IDX": "*i64", "VALID": "*i1", "O": "*fp32", "M": "*fp32", "L": "*fp32", "qk_scale": "fp32"}
for dt, D, G2, has_valid in [("bf16", 128, 4, False), ("fp16", 64, 8, True), ("fp32", 80, 1, True), ("bf16", 256, 1, False)]:
    consts = dict(D=D, DV=D, HAS_VALID=has_valid, PREC="tf32x3", BLOCK_G=max(16, triton.next_power_of_2(G2)), BLOCK_N=64,
                  BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(D))
    sig = {n: "constexpr" if n in consts else PTR.get(n, "i32").format(dt=dt) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert len(c.asm["cubin"]) > 0
    print(dt, D, G2, has_valid, "ok")
'''


def test_kernel_compiles_for_sm90_ahead_of_time():
    # the interpreter is lenient about types; compiling for a real target (no GPU needed) checks the compiled front end
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert r.stdout.count(" ok") == 4, r.stdout


@pytest.mark.parametrize("layout", ["contiguous", "head_dim_slice", "seq_slice", "transposed"])
def test_gather_rows_equals_advanced_indexing(layout):
    "The torch path's row gather (index_select on a flattened view, or advanced indexing) reads exactly t[b, hk[h], pos]."
    g = torch.Generator().manual_seed(SEED)
    B, Hkv, N, D, Hq, K = 2, 3, 17, 5, 6, 7
    base = torch.randn(B, Hkv, N + 4, D + 3, generator=g)
    t = {"contiguous": base[:, :, :N, :D].contiguous(), "head_dim_slice": base[:, :, :N].contiguous()[..., :D],  # rows strided by D + 3: still one view
         "seq_slice": base[:, :, 2:2 + N, :D], "transposed": base[:, :, :N, :D].contiguous().transpose(1, 2).contiguous().transpose(1, 2)}[layout]
    for Hi in (Hkv, Hq):
        pos = torch.randint(0, N, (B, Hi, K), generator=g)
        hk = S._head_map(Hi, Hq, Hkv, t.device)[None, :, None]
        want = t[torch.arange(B)[:, None, None], hk, pos]
        assert torch.equal(S._gather_rows(t, pos, hk), want), (layout, Hi)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=kernel)])
def test_check_range_off_same_result(impl):
    "check_range=False (what the dynamic selectors use) gives the same output; the default still refuses out-of-range positions."
    q, k, v, idx, valid = inputs(SEED, 2, 4, 2, 23, 16, 16, 7, torch.float32)
    a = sparse_decode_attention(q, k, v, idx, impl=impl)
    b = sparse_decode_attention(q, k, v, idx, impl=impl, check_range=False)
    assert torch.equal(a, b)
    bad = idx.clone(); bad[0, 0, 0] = 23
    with pytest.raises(InputError, match="N=23"): sparse_decode_attention(q, k, v, bad, impl=impl)
