"""Streaming vocab-statistics kernel vs a float64 torch reference (issue 5).

On CPU the Triton kernels run in the interpreter: `TRITON_INTERPRET=1` is set here before triton is imported (Triton
reads it for its own library at import and for our kernels at their first launch). If another test module imported
triton earlier in the same pytest process without the flag, the kernel tests fail with a ConfigError saying so: set
TRITON_INTERPRET=1 in the environment (or a conftest.py) in that case. Sizes are small because the interpreter is
slow; on a CUDA machine the same tests run the compiled kernels on the GPU.
"""
import os
import torch  # importing torch does not import triton
if not torch.cuda.is_available():
    # must happen before triton is first imported in this process (its library functions follow the flag then)
    os.environ["TRITON_INTERPRET"] = "1"
import math
import pytest

from tokexp.core import InputError, ConfigError
from tokexp.kernels import vocab as kv
from tokexp.kernels.vocab import (VocabStats, vocab_stats, vocab_stats_torch, vocab_stats_triton, cross_stats,
                                  cross_stats_torch, cross_stats_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.skipif(not kv.HAS_TRITON, reason="triton not installed"),
              # interpreter (numpy) warnings about 0*-inf in masked lanes and overflow at ±3e38, discarded by tl.where
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

FIELDS = ["lse", "logp", "rank", "entropy", "max_logp", "mass_geq", "mean_logp", "var_logp"]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEV == "cpu": monkeypatch.setenv("TRITON_INTERPRET", "1")


def ref64(logits, targets):
    return vocab_stats_torch(logits.cpu(), targets.cpu(), chunk=0, dtype=torch.float64)


def assert_close_stats(got: VocabStats, want: VocabStats, atol=2e-5, rtol=2e-5, rank_exact=True):
    assert got.lse.shape == want.lse.shape
    for f in FIELDS:
        g, w = getattr(got, f).cpu(), getattr(want, f).cpu()
        if f == "rank":
            assert g.dtype == torch.int64
            if rank_exact: assert torch.equal(g, w), (f, g, w)
            continue
        assert g.dtype == torch.float32, (f, g.dtype)
        assert torch.isfinite(g).all(), f
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m: f"{f}: {m}")


def rand_case(shape, V, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, V, tuple(shape), generator=g)
    return x.to(DEV), t.to(DEV)


# --- the torch reference itself -------------------------------------------------------------------------------------

def test_reference_matches_naive_float64():
    x, t = rand_case((4, 6), 53, seed=1)
    st = ref64(x, t)
    lp = torch.log_softmax(x.cpu().double(), -1)
    p = lp.exp()
    lt = x.cpu().double().gather(-1, t.cpu()[..., None])[..., 0]
    torch.testing.assert_close(st.logp, lp.gather(-1, t.cpu()[..., None])[..., 0])
    torch.testing.assert_close(st.entropy, -(p * lp).sum(-1))
    torch.testing.assert_close(st.var_logp, (p * lp ** 2).sum(-1) - (p * lp).sum(-1) ** 2)
    torch.testing.assert_close(st.max_logp, lp.amax(-1))
    torch.testing.assert_close(st.mass_geq, (p * (x.cpu().double() >= lt[..., None])).sum(-1))
    assert torch.equal(st.rank, (x.cpu() > x.cpu().gather(-1, t.cpu()[..., None])).sum(-1) + 1)


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_reference_chunking_is_exact(chunk):
    x, t = rand_case((3, 7), 101, seed=2)
    assert_close_stats(vocab_stats_torch(x.cpu(), t.cpu(), chunk=chunk), ref64(x, t))


# --- kernel vs float64 reference ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,V,block", [((5,), 1, 16), ((3,), 7, 16), ((1,), 1000, 256), ((2, 3), 1000, 128),
                                          ((2,), 4099, 1024), ((1, 1), 4099, 2048), ((4,), 64, 64)])
def test_kernel_matches_float64(shape, V, block):
    x, t = rand_case(shape, V, seed=V + len(shape))
    assert_close_stats(vocab_stats_triton(x, t, block_v=block), ref64(x, t))


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_kernel_split_rows(splits):
    # rows cut into slices merged by the combine kernel (used on GPUs when rows are few); last slices may be empty
    x, t = rand_case((3,), 1000, seed=10 + splits)
    assert_close_stats(vocab_stats_triton(x, t, block_v=64, splits=splits), ref64(x, t))


def test_kernel_default_block_and_auto():
    x, t = rand_case((2, 2), 333, seed=3)
    assert_close_stats(vocab_stats_triton(x, t), ref64(x, t))
    assert_close_stats(vocab_stats(x, t, impl="triton"), ref64(x, t))
    assert_close_stats(vocab_stats(x, t, impl="torch"), ref64(x, t))
    assert_close_stats(vocab_stats(x, t), ref64(x, t))  # auto: kernel on CUDA, torch on CPU


def test_kernel_target_at_edges():
    # target in the first column, last column and last (partial) tile
    V = 300
    x, _ = rand_case((3,), V, seed=4)
    t = torch.tensor([0, V - 1, 257], device=DEV)
    assert_close_stats(vocab_stats_triton(x, t, block_v=128), ref64(x, t))


def test_kernel_noncontiguous_input():
    x, t = rand_case((4, 3), 130, seed=5)
    xt = x.transpose(0, 1)  # [3, 4, V] view with non-standard row strides
    assert_close_stats(vocab_stats_triton(xt, t.T, block_v=64), ref64(xt, t.T))
    xs = torch.randn(6, 2 * 70, device=DEV)[:, ::2]  # stride(-1) == 2
    ts = torch.arange(6, device=DEV)
    assert_close_stats(vocab_stats_triton(xs, ts, block_v=32), ref64(xs, ts))
    xl, tl_ = rand_case((3, 5), 90, seed=55)
    xl, tl_ = xl[:, :-1], tl_[:, 1:]  # the usual causal-LM slice: two row strides, addressed without a copy
    assert kv._row_addressing(xl)[1:] == (4, 5 * 90, 90)
    assert_close_stats(vocab_stats_triton(xl, tl_, block_v=32, splits=2), ref64(xl, tl_))
    m1, _ = cross_stats_triton(xl, xl.flip(0), block_v=32)
    torch.testing.assert_close(m1.cpu().double(), cross64(xl, xl.flip(0))[0], atol=2e-5, rtol=2e-5)
    xb = torch.randn(2, 3, 4, 50, device=DEV).transpose(1, 2)  # [2, 4, 3, 50]: needs one copy
    tb = torch.randint(0, 50, (2, 4, 3), device=DEV)
    assert_close_stats(vocab_stats_triton(xb, tb, block_v=32), ref64(xb, tb))


# --- ties, extremes, dtypes ------------------------------------------------------------------------------------------

def test_ties_rank_strict_mass_inclusive():
    V = 37
    x = torch.zeros(4, V)
    x[0] = 1.0                                   # all tied: rank 1, mass 1
    x[1, :10] = 2.0; x[1, 10:] = -1.0            # target tied with 9 others at the top
    x[2] = torch.arange(V).float() % 5           # many ties at several levels
    x[3, 5] = 3.0                                # target below a single larger entry, tied with the rest
    t = torch.tensor([3, 4, 7, 0])
    x, t = x.to(DEV), t.to(DEV)
    st = vocab_stats_triton(x, t, block_v=16)
    want = ref64(x, t)
    assert_close_stats(st, want)
    assert st.rank.tolist() == [1, 1, 1 + int((x[2] > 2).sum()), 2]
    assert abs(st.mass_geq[0].item() - 1) < 1e-6
    top = 10 * math.exp(2.0)  # ties included: the 10 tokens tied with the target at the top all count
    assert st.mass_geq[1].item() == pytest.approx(top / (top + 27 * math.exp(-1.0)), rel=1e-6)
    assert st.var_logp[0].item() == pytest.approx(0, abs=1e-6)


def test_extreme_finite_logits():
    V = 200
    x = torch.randn(4, V) * 3
    x[0, 17] = 1e4; x[0, 3] = -1e4                 # one huge spike and one huge dip
    x[1] = -1e4; x[1, 150] = 1e4                   # everything at -1e4 but one
    x[2, ::2] = 1e4; x[2, 1::2] = -1e4             # half at the top (ties at 1e4)
    x[3] = torch.linspace(-1e4, 1e4, V)            # spread out
    t = torch.tensor([3, 150, 0, 199])
    x, t = x.to(DEV), t.to(DEV)
    st = vocab_stats_triton(x, t, block_v=64)
    assert_close_stats(st, ref64(x, t), atol=1e-3, rtol=1e-6)  # log p near -2e4: 1e-6 relative in float32
    assert st.rank.tolist() == [V - 0, 1, 1, 1]
    assert st.entropy[2].item() == pytest.approx(math.log(V // 2), abs=1e-4)


def test_fp32_extremes_no_nan():
    x = torch.tensor([[-3e38, 3e38, 0.0, 1.0]], device=DEV)
    st = vocab_stats_triton(x, torch.tensor([2], device=DEV), block_v=4)
    for f in FIELDS: assert torch.isfinite(getattr(st, f).float()).all(), f
    assert st.rank.item() == 3 and st.entropy.item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    x, t = rand_case((2, 3), 517, seed=6, dtype=dtype)
    st = vocab_stats_triton(x, t, block_v=128)
    assert_close_stats(st, ref64(x, t))  # the reference sees the same rounded half values; kernel accumulates fp32
    assert_close_stats(vocab_stats_torch(x, t), ref64(x, t))


# --- every output element is written --------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [1, 3])
def test_poisoned_outputs_fully_written(splits):
    x, t = rand_case((9,), 300, seed=7)
    N = 9
    out = VocabStats(*(torch.full((N,), -7, dtype=torch.int64, device=DEV) if f == "rank"
                       else torch.full((N,), float("nan"), device=DEV) for f in FIELDS))
    st = vocab_stats_triton(x, t, block_v=64, splits=splits, out=out)
    assert st.lse.data_ptr() == out.lse.data_ptr()
    for f in FIELDS:
        v = getattr(out, f)
        assert torch.isfinite(v.float()).all() and (v >= 1).all() if f == "rank" else torch.isfinite(v).all(), f
    assert_close_stats(st, ref64(x, t))


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logits_raise(impl, bad):
    x, t = rand_case((2, 3), 40, seed=8)
    x[1, 2, 33] = bad
    with pytest.raises(InputError, match=r"NaN or ±inf at position \(1, 2\)"):
        vocab_stats(x, t, impl=impl)
    with pytest.raises(InputError, match="logits_score"):
        cross_stats(torch.zeros_like(x), x, impl=impl)
    with pytest.raises(InputError, match=r"logits_ref contain NaN or ±inf at position \(1, 2\)"):
        cross_stats(x, torch.zeros_like(x), impl=impl)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_targets_and_shapes(impl):
    x, t = rand_case((2, 3), 40, seed=9)
    for bad in (40, -1):
        tt = t.clone(); tt[0, 1] = bad
        with pytest.raises(InputError, match=rf"target id {bad} at position \(0, 1\) is outside the vocabulary \[0, 40\)"):
            vocab_stats(x, tt, impl=impl)
    with pytest.raises(InputError, match="does not match"):
        vocab_stats(x, t[:, :2], impl=impl)
    with pytest.raises(InputError, match="integer"):
        vocab_stats(x, t.float(), impl=impl)
    with pytest.raises(InputError, match="floating"):
        vocab_stats(t, t, impl=impl)
    with pytest.raises(InputError, match="empty vocabulary"):
        vocab_stats(x[..., :0], t, impl=impl)
    with pytest.raises(InputError, match="share one tokenizer"):
        cross_stats(x, x[..., :-1], impl=impl)
    with pytest.raises(InputError, match="same shape"):
        cross_stats(x, x[:1], impl=impl)
    with pytest.raises(ConfigError, match="valid: auto, triton, torch"):
        vocab_stats(x, t, impl="fast")


def test_empty_batch():
    x = torch.zeros(0, 5, 11, device=DEV); t = torch.zeros(0, 5, dtype=torch.long, device=DEV)
    for impl in ("triton", "torch"):
        st = vocab_stats(x, t, impl=impl)
        assert st.lse.shape == (0, 5) and st.rank.dtype == torch.int64


@pytest.mark.skipif(DEV != "cpu", reason="CPU-only behaviour")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, t = rand_case((2,), 10, seed=0)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        vocab_stats(x, t, impl="triton")
    assert_close_stats(vocab_stats(x, t), ref64(x, t))  # auto still works on CPU


def test_interpreter_flag_set_after_triton_import_is_a_clear_error():
    import subprocess, sys
    code = ("import os, torch, triton\nos.environ['TRITON_INTERPRET'] = '1'\nfrom tokexp.kernels.vocab import vocab_stats\n"
            "vocab_stats(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), impl='triton')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "before the first `import triton`" in r.stderr, r.stderr[-2000:]


# --- cross statistics -----------------------------------------------------------------------------------------------

def cross64(r, s):
    p = torch.softmax(r.cpu().double(), -1); lq = torch.log_softmax(s.cpu().double(), -1)
    return (p * lq).sum(-1), (p * lq ** 2).sum(-1)


@pytest.mark.parametrize("shape,V,block", [((3,), 1, 16), ((2, 2), 7, 16), ((3,), 1000, 256), ((2,), 4099, 1024)])
def test_cross_kernel_matches_float64(shape, V, block):
    r, _ = rand_case(shape, V, seed=20 + V)
    s, _ = rand_case(shape, V, seed=21 + V, scale=2.0)
    w1, w2 = cross64(r, s)
    for m1, m2 in (cross_stats_triton(r, s, block_v=block), cross_stats_torch(r, s), cross_stats(r, s)):
        assert m1.dtype == torch.float32 and m1.shape == tuple(shape)
        torch.testing.assert_close(m1.cpu().double(), w1, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(m2.cpu().double(), w2, atol=1e-4, rtol=2e-5)


def test_cross_of_self_is_own_moments():
    x, t = rand_case((4,), 300, seed=30)
    m1, m2 = cross_stats_triton(x, x, block_v=64)
    want = ref64(x, t)
    torch.testing.assert_close(m1.cpu().double(), want.mean_logp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close((m2 - m1 ** 2).cpu().double(), want.var_logp, atol=1e-4, rtol=1e-4)


def test_cross_extremes_and_half():
    V = 130
    r = torch.randn(3, V) * 3; s = torch.randn(3, V) * 3
    r[0, 5] = 1e4; s[0, 5] = -1e4           # ref puts all mass where score puts none: E[log q] ~ -2e4
    s[1] = torch.linspace(-1e4, 1e4, V)
    r[2] = -1e4; s[2, :64] = 1e4
    r, s = r.to(DEV), s.to(DEV)
    m1, m2 = cross_stats_triton(r, s, block_v=64)
    w1, w2 = cross64(r, s)
    torch.testing.assert_close(m1.cpu().double(), w1, atol=1e-2, rtol=1e-5)
    torch.testing.assert_close(m2.cpu().double(), w2, atol=1e-2, rtol=1e-5)
    rb, sb = r.to(torch.bfloat16), s.to(torch.bfloat16)
    m1, m2 = cross_stats_triton(rb, sb, block_v=64)
    w1, w2 = cross64(rb, sb)
    torch.testing.assert_close(m1.cpu().double(), w1, atol=1e-2, rtol=1e-5)


# --- fused LM head: statistics from hidden states --------------------------------------------------------------------

from tokexp.kernels.vocab import vocab_stats_from_hidden, vocab_stats_from_hidden_torch, vocab_stats_from_hidden_triton  # noqa: E402


def hidden_case(shape, d, V, seed, dtype=torch.float32, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * (2 / math.sqrt(d))
    b = torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    t = torch.randint(0, V, tuple(shape), generator=g)
    cast = lambda v: None if v is None else v.to(dtype).to(DEV)
    return cast(h), cast(w), cast(b), t.to(DEV)


def hidden_ref64(h, w, b, t):
    x = h.cpu().double() @ w.cpu().double().T + (0 if b is None else b.cpu().double())
    return ref64(x, t)


@pytest.mark.parametrize("shape,d,V,bias", [((5,), 24, 50, True), ((2, 3), 40, 300, False), ((1,), 16, 1, True),
                                            ((17,), 70, 129, True)])
def test_hidden_kernel_matches_float64(shape, d, V, bias):
    h, w, b, t = hidden_case(shape, d, V, seed=40 + V, with_bias=bias)
    want = hidden_ref64(h, w, b, t)
    assert_close_stats(vocab_stats_from_hidden_triton(h, w, t, b, block_n=16, block_v=64, block_d=16), want, atol=5e-5, rtol=5e-5)
    assert_close_stats(vocab_stats_from_hidden_torch(h, w, t, b, chunk=4), want, atol=5e-5, rtol=5e-5)
    assert_close_stats(vocab_stats_from_hidden(h, w, t, b), want, atol=5e-5, rtol=5e-5)


def test_hidden_kernel_bf16():
    h, w, b, t = hidden_case((2, 5), 32, 200, seed=50, dtype=torch.bfloat16)
    want = hidden_ref64(h, w, b, t)  # same rounded bf16 inputs, float64 math; the kernel accumulates in fp32
    assert_close_stats(vocab_stats_from_hidden_triton(h, w, t, b, block_v=64, block_d=16), want, atol=1e-4, rtol=1e-4, rank_exact=False)


def test_hidden_kernel_ties_exact_integers():
    # small integers: every logit is exact in fp32 whatever the summation order, so ties are exact ties
    V, d = 70, 16
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-2, 3, (V, d), generator=g).float()
    w[10:20] = w[5]  # ten duplicates of token 5
    h = torch.randint(-2, 3, (20, d), generator=g).float()
    t = torch.full((20,), 5); t[::2] = 12
    h, w, t = h.to(DEV), w.to(DEV), t.to(DEV)
    st = vocab_stats_from_hidden_triton(h, w, t, block_v=32, block_d=16)
    assert_close_stats(st, ref64(h @ w.T, t))


def test_hidden_poisoned_and_bad_input():
    h, w, b, t = hidden_case((20,), 24, 90, seed=60)
    out = VocabStats(*(torch.full((20,), -7, dtype=torch.int64, device=DEV) if f == "rank"
                       else torch.full((20,), float("nan"), device=DEV) for f in FIELDS))
    vocab_stats_from_hidden_triton(h, w, t, b, out=out, block_v=32, block_d=16)
    assert_close_stats(out, hidden_ref64(h, w, b, t), atol=5e-5, rtol=5e-5)
    h2 = h.clone(); h2[7, 3] = float("nan")
    for impl in ("triton", "torch"):
        with pytest.raises(InputError, match=r"NaN or ±inf at position \(7,\)"):
            vocab_stats_from_hidden(h2, w, t, b, impl=impl)
        with pytest.raises(InputError, match="does not match the LM-head weight"):
            vocab_stats_from_hidden(h[:, :-1], w, t, b, impl=impl)
        with pytest.raises(InputError, match=r"bias must have shape \(90,\)"):
            vocab_stats_from_hidden(h, w, t, b[:-1], impl=impl)
        with pytest.raises(InputError, match="outside the vocabulary"):
            vocab_stats_from_hidden(h, w, t + 90, b, impl=impl)
    with pytest.raises(InputError, match="same dtype"):
        vocab_stats_from_hidden_triton(h, w.double(), t, b)


# --- the compiled (non-interpreted) kernels build for real GPUs -----------------------------------------------------
# No GPU here, but Triton can compile ahead of time for a given target: this runs the real frontend, MLIR passes,
# LLVM and ptxas, catching anything the interpreter accepts but the compiler does not. It runs in a fresh process
# without TRITON_INTERPRET (Triton's own library functions are defined in interpreter mode once the flag is on).

COMPILE_SCRIPT = r"""
import inspect, sys, triton
from triton.runtime.jit import JITFunction
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from tokexp.kernels import vocab as kv

OUTS = {"LSE": "*fp32", "LOGP": "*fp32", "RANK": "*i64", "ENT": "*fp32", "MAXLP": "*fp32", "MASS": "*fp32",
        "MEAN": "*fp32", "VAR": "*fp32", "BAD": "*i32"}

def comp(fn, types, constexprs, arch, num_warps=4):
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in inspect.signature(fn).parameters}
    k = triton.compile(ASTSource(JITFunction(fn), sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps})
    assert k.asm.get("cubin"), "no cubin"
    print("ok", fn.__name__, arch, constexprs, flush=True)

for arch in map(int, sys.argv[1:]):
    for xd, split in (("bf16", False), ("fp32", True), ("fp16", False)):
        comp(kv._vocab_kernel, {"X": f"*{xd}", "T": "*i64", "INNER": "i32", "stride_o": "i64", "stride_i": "i64", "V": "i32", "cols_per_split": "i32",
                                "WS": "*fp32", "WI": "*i32", "N": "i32", **OUTS}, {"BLOCK_V": 4096, "SPLIT": split}, arch, 8)
    comp(kv._vocab_combine_kernel, {"WS": "*fp32", "WI": "*i32", "N": "i32", "NSP": "i32", "T": "*i64", "X": "*bf16",
                                    "INNER": "i32", "stride_o": "i64", "stride_i": "i64", **OUTS}, {"BLOCK_S": 64}, arch)
    comp(kv._cross_kernel, {"R": "*bf16", "S": "*bf16", "INNER_R": "i32", "stride_ro": "i64", "stride_ri": "i64",
                            "INNER_S": "i32", "stride_so": "i64", "stride_si": "i64", "V": "i32",
                            "M1": "*fp32", "M2": "*fp32", "BAD": "*i32"}, {"BLOCK_V": 4096}, arch, 8)
    for dt, ieee, bias in (("bf16", False, True), ("fp32", True, False)):
        comp(kv._hidden_kernel, {"H": f"*{dt}", "Wt": f"*{dt}", "Bias": f"*{dt}", "T": "*i64", "N": "i32", "V": "i32",
                                 "D": "i32", "stride_h": "i64", "stride_w": "i64", **OUTS},
             {"HAS_BIAS": bias, "IEEE": ieee, "BLOCK_N": 16, "BLOCK_V": 128, "BLOCK_D": 64}, arch)
print("ALL OK")
"""


def test_kernels_compile_for_gpu_targets():
    import subprocess, sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, "80", "90"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_auto_falls_back_to_torch_when_the_kernel_fails(monkeypatch):
    x, t = rand_case((2, 3), 20, seed=70)
    def broken(*a, **k): raise RuntimeError("no kernel for this GPU")
    monkeypatch.setattr(kv, "vocab_stats_triton", broken)
    monkeypatch.setattr(kv, "_use_triton", lambda x, impl: impl != "torch")
    monkeypatch.setattr(kv, "_KERNEL_FAILED", set())
    with pytest.warns(UserWarning, match="Triton vocab kernel failed"):
        st = kv.vocab_stats(x, t)
    assert_close_stats(st, ref64(x, t))
    with pytest.raises(RuntimeError, match="no kernel"):
        kv.vocab_stats(x, t, impl="triton")
    with pytest.raises(InputError):  # input errors are not swallowed by the fallback
        kv.vocab_stats(x, t + 20)
