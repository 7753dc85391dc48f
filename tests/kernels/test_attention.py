"""q3n::attention against a float64 reference (CPU lane: Triton interpreter; GPU lane: -m gpu)."""

import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from q3n_compile.kernels import attention as A

from .subprocess_lane import run_without_interpreter

op = torch.ops.q3n.attention

# Triton 3.6's interpreter turns each runtime loop bound into an int through a 1-element array.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# Max |kernel - float64| on O(1) outputs. The fp16/bf16 bounds are loose backstops; the sharp
# check is "no farther from float64 than SDPA in the same dtype" below.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Slack on top of 2x SDPA's error: both round the output once, so a single half-ulp step of
# difference must not fail the test.
SLACK = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _randn(gen, *shape, dtype, device="cpu"):
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _exact(q, k, v, mask, scale, causal):
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return A.reference(q.double(), k.double(), v.double(), m, scale, causal)


def _sdpa(q, k, v, mask, scale, causal):
    """SDPA in q's dtype; causal+mask folded into one mask (CUDA backends refuse the pair)."""
    Sq, Sk = q.shape[2], k.shape[2]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if causal and mask is not None:
        keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _check(q, k, v, mask=None, scale=None, causal=False):
    out = op(q, k, v, mask, scale, causal)
    assert out.shape == q.shape[:-1] + (v.shape[-1],)
    assert out.dtype == q.dtype and out.device == q.device
    assert not torch.isnan(out).any()
    exact = _exact(q, k, v, mask, scale, causal)
    err = (out.double() - exact).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs err {err:.3g} > {TOL[q.dtype]:.3g}"
    if q.dtype in SLACK:
        eager = _sdpa(q, k, v, mask, scale, causal)
        eager_err = (eager.double() - exact).abs().max().item()
        assert err <= 2 * eager_err + SLACK[q.dtype], (
            f"kernel err {err:.3g} vs SDPA {q.dtype} err {eager_err:.3g}")
    return out


def _qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu", Dv=None):
    return (_randn(gen, B, Hq, Sq, D, dtype=dtype, device=device),
            _randn(gen, B, Hkv, Sk, D, dtype=dtype, device=device),
            _randn(gen, B, Hkv, Sk, Dv or D, dtype=dtype, device=device))


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture
def fresh_plans():
    """Launch plans are cached per call signature: a test that patches a planning rule starts
    and ends with none, so the patch applies and does not outlive the test."""
    A.clear_plans()
    yield
    A.clear_plans()

# (B, Hq, Hkv, Sq, Sk, D, dtype, causal); every length is off the 16-wide interpreter tiles.
CPU_CASES = {
    "square_odd_f32": (2, 2, 2, 37, 37, 64, f32, False),
    "square_odd_causal_d40_f16": (1, 2, 2, 37, 37, 40, f16, True),
    "short_q_d16_bf16": (1, 2, 2, 5, 33, 16, bf16, False),
    "short_q_causal_f16": (1, 2, 2, 5, 33, 16, f16, True),
    "long_q_causal_f32": (1, 2, 2, 33, 5, 16, f32, True),
    "gqa2_causal_d64_bf16": (1, 4, 2, 37, 37, 64, bf16, True),
    "gqa1_d40_f32": (1, 4, 1, 21, 45, 40, f32, False),
    "decode_q1_bf16": (2, 4, 2, 1, 37, 16, bf16, False),
}


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_no_mask(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, causal = CPU_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    _check(*_qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype), causal=causal)


def test_bool_padding_mask_gqa():
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 1, 20, 45, 40
    q, k, v = _qkv(gen, B, Hq, Hkv, Sq, Sk, D, f16)
    keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool)
    keep[1, ..., 29:] = False  # batch 1 is padded: keys 29.. (a whole 16-key tile) are gone
    keep[0, ..., 0] = False
    _check(q, k, v, keep)
    _check(q, k, v, keep, causal=True)


def test_additive_mask_broadcast_over_batch_and_heads():
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(gen, 2, 2, 2, 37, 37, 16, bf16)
    bias = 2 * torch.randn(37, 37, generator=gen)  # [Sq, Sk] -> [B, Hq, Sq, Sk] by strides
    _check(q, k, v, bias)


def test_additive_mask_with_causal_and_scale():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, 1, 4, 2, 23, 37, 40, f32)
    bias = torch.randn(1, 4, 23, 37, generator=gen)
    bias[0, 1, :, 7:19] = float("-inf")
    _check(q, k, v, bias, scale=0.3, causal=True)


def test_fully_masked_rows_are_zero():
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(gen, 2, 2, 2, 21, 19, 16, f16)
    keep = torch.rand(2, 1, 21, 19, generator=gen) > 0.4
    keep[:, :, 3] = False
    keep[1, :, 17] = False
    out = _check(q, k, v, keep)
    assert out[:, :, 3].abs().max() == 0 and out[1, :, 17].abs().max() == 0
    neg_inf = torch.zeros(21, 19).masked_fill(~keep[0, 0], float("-inf"))
    out = _check(q.float(), k.float(), v.float(), neg_inf)
    assert out[:, :, 3].abs().max() == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")  # finfo.min * log2(e)
def test_finfo_min_mask_rows_average_v_like_sdpa():
    # HF's additive masks use finfo.min: such a row is not "fully masked" for SDPA, it averages V.
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(gen, 1, 2, 2, 18, 20, 16, f32)
    bias = torch.zeros(18, 20)
    bias[:, 15:] = torch.finfo(torch.float32).min
    bias[4] = torch.finfo(torch.float32).min
    out = _check(q, k, v, bias)
    torch.testing.assert_close(out[:, :, 4], v.mean(dim=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _sdpa(q, k, v, bias, None, False), atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs_and_mask():
    gen = torch.Generator().manual_seed(6)
    B, S, Hq, Hkv, D = 2, 29, 4, 2, 64
    q = _randn(gen, B, S, Hq, D, dtype=f16).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    kv = _randn(gen, B, S, 2, Hkv, D, dtype=f16)  # fused kv projection, sliced without a copy
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    keep = (torch.rand(S, S, generator=gen) > 0.3).t()  # transposed bool mask
    keep.diagonal().fill_(True)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or keep.is_contiguous())
    _check(q, k, v, keep, causal=True)


def test_value_head_dim_differs():
    gen = torch.Generator().manual_seed(7)
    q, k, v = _qkv(gen, 1, 2, 1, 19, 23, 32, f32, Dv=16)
    _check(q, k, v, causal=True)


def test_reference_matches_float64_sdpa():
    gen = torch.Generator().manual_seed(8)
    q, k, v = _qkv(gen, 2, 4, 2, 13, 17, 16, torch.float64)
    keep = torch.rand(2, 1, 13, 17, generator=gen) > 0.3
    keep[0, 0, 2] = False  # a fully masked row: SDPA gives 0 there too
    bias = torch.randn(4, 13, 17, generator=gen, dtype=torch.float64)
    for mask in (None, keep, bias):
        for causal in (False, True):
            got = A.reference(q, k, v, mask, None, causal)
            want = _sdpa(q, k, v, mask, None, causal)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    got = A.reference(q.float(), k.float(), v.float(), keep, 0.5, True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _sdpa(q, k, v, keep, 0.5, True), atol=1e-5, rtol=1e-5)


def test_supports_reasons():
    meta = dict(device="meta")
    q = torch.empty(2, 8, 5, 64, **meta)
    kv = torch.empty(2, 4, 7, 64, **meta)
    assert A.supports(q, kv, kv) is None
    assert A.supports(q, kv, kv, torch.empty(5, 7, dtype=torch.bool, **meta), None, True) is None
    big = torch.empty(2, 8, 5, 320, **meta)
    assert "head dim 320 > 256" in A.supports(big, big, big)
    assert "not a multiple" in A.supports(torch.empty(2, 6, 5, 64, **meta), kv, kv)
    q64 = q.double()
    assert "float64" in A.supports(q64, kv.double(), kv.double())
    assert "dtypes differ" in A.supports(q, kv.half(), kv.half())
    assert "4-D" in A.supports(q[0], kv, kv)
    assert "int32" in A.supports(q, kv, kv, torch.empty(5, 7, dtype=torch.int32, **meta))
    assert "not broadcastable" in A.supports(q, kv, kv, torch.empty(3, 7, **meta))
    assert "k head dim" in A.supports(q, torch.empty(2, 4, 7, 32, **meta), kv)
    with pytest.raises(ValueError, match="head dim 320"):
        cpu = torch.randn(1, 1, 3, 320)
        A._launch(cpu, cpu, cpu, None, None, False, interpreter=True)


def _symbolic(mode, t, name, dynamic_dims):
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    dims = [DimDynamic.DYNAMIC if i in dynamic_dims else DimDynamic.STATIC for i in range(t.dim())]
    return mode.from_tensor(t, source=ConstantSource(name),
                            symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


def test_fake_and_supports_with_symbolic_sizes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, statically_known_true

    mode = FakeTensorMode(shape_env=ShapeEnv())
    q = _symbolic(mode, torch.randn(2, 4, 7, 16), "q", {0, 2})
    k = _symbolic(mode, torch.randn(2, 2, 9, 16), "k", {0, 2})
    v = _symbolic(mode, torch.randn(2, 2, 9, 24), "v", {0, 2})
    mask = _symbolic(mode, torch.ones(2, 1, 7, 9, dtype=torch.bool), "mask", {0, 2, 3})
    with mode:
        assert A.supports(q, k, v, mask, None, True) is None
        out = op(q, k, v, mask, None, True)
    assert isinstance(out.shape[0], torch.SymInt) and isinstance(out.shape[2], torch.SymInt)
    assert statically_known_true(out.shape[0] == q.shape[0])
    assert statically_known_true(out.shape[2] == q.shape[2])
    assert tuple(out.shape[1:2]) + tuple(out.shape[3:]) == (4, 24)
    assert out.dtype == q.dtype
    # A symbolic head dim cannot be proven <= 256: the pass must be told why it may not lower.
    qd = _symbolic(mode, torch.randn(2, 4, 7, 16), "qd", {3})
    assert "head dim" in A.supports(qd, qd, qd)


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    q, k, v = _qkv(gen, 1, 2, 1, 9, 13, 16, f32)
    keep = torch.rand(9, 13, generator=gen) > 0.2
    torch.library.opcheck(op, (q, k, v, keep, None, True))
    torch.library.opcheck(op, (q, k, v))


def test_choose_blocks_table_on_hopper():
    H = dict(arch=9)
    assert A.choose_blocks(4096, 4096, 128, bf16, True, **H) == dict(
        BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    assert A.choose_blocks(4096, 4096, 256, f16, False, **H)["num_stages"] == 2
    assert A.choose_blocks(4096, 4096, 256, f32, False, **H)["BLOCK_N"] == 16
    # Tiles never exceed the padded lengths: a 20-token prompt gets 32 x 32.
    short = A.choose_blocks(20, 20, 128, bf16, False, **H)
    assert (short["BLOCK_M"], short["BLOCK_N"]) == (32, 32)
    assert A.choose_blocks(37, 37, 64, f32, False, interpreter=True)["BLOCK_M"] == 16
    for d in (16, 40, 64, 80, 96, 128, 256):
        for dtype in (f16, bf16, f32):
            for sk in (1, 65, 300, 5000, 100_000):
                cfg = A.choose_blocks(1000, sk, d, dtype, True, **H)
                assert min(cfg["BLOCK_M"], cfg["BLOCK_N"]) >= 16  # tl.dot's minimum


def test_block_table_buckets_by_key_length():
    from q3n_compile.kernels import attention_blocks as AB

    assert [AB.bucket_index(n) for n in (0, 64, 65, 512, 513, 16384, 16385, 10**7)] == [
        0, 0, 1, 3, 4, 8, 9, 9]
    # The bucket (not Sq) decides: the same Sk gives the same key tile whatever the query length.
    for sk in (100, 3000, 50_000):
        a = A.choose_blocks(4096, sk, 128, bf16, False, arch=9)
        b = A.choose_blocks(300, sk, 128, bf16, False, arch=9)
        assert a["BLOCK_N"] == b["BLOCK_N"] and a["num_stages"] == b["num_stages"]
    # A short key range gets a smaller query tile than a long one (more programs, short prompts).
    assert (A.choose_blocks(4096, 100, 128, bf16, False, arch=9)["BLOCK_M"]
            < A.choose_blocks(4096, 4096, 128, bf16, False, arch=9)["BLOCK_M"])
    for key, row in AB.BLOCK_TABLE.items():
        assert len(row) == len(AB.BUCKET_BOUNDS), key
        for cfg in row:
            assert all(triton_pow2(x) for x in (cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps)), key
            assert cfg.BLOCK_M >= 16 and cfg.BLOCK_N >= 16 and cfg.num_stages >= 1, key
        if key[1] == "float16":  # same element size and tensor-core path as bfloat16
            assert row == AB.BLOCK_TABLE[(key[0], "bfloat16", key[2], key[3])]
    with pytest.raises(TypeError):  # read-only: no module-level mutable state
        AB.BLOCK_TABLE[(64, "bfloat16", False, 7)] = ()


def triton_pow2(n):
    return n > 0 and n & (n - 1) == 0


def test_untabled_arch_autotunes_once_per_bucket(monkeypatch):
    from q3n_compile.kernels import attention_blocks as AB

    calls = []

    def fake_autotune(d, dtype, causal, arch, bucket, device):
        calls.append((d, dtype, causal, arch, bucket, device))
        return AB.Blocks(64, 32, 4, 2)

    monkeypatch.setattr(AB, "_autotuned", fake_autotune)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cfg = A.choose_blocks(2000, 3000, 80, f16, True, arch=8, device=0)
    assert cfg == dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    assert calls == [(128, "float16", True, 8, AB.bucket_index(3000), 0)]
    # During a CUDA graph capture nothing is timed: the rule of thumb, not cached.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert A.choose_blocks(2000, 3000, 80, f16, True, arch=8, device=0)["BLOCK_M"] == 128
    assert len(calls) == 1
    monkeypatch.undo()
    assert hasattr(AB._autotuned, "cache_info")  # the real one: one timing per key per process


def test_choose_blocks_without_gpu_needs_an_arch():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device gives the default arch")
    with pytest.raises(ValueError, match="arch="):
        A.choose_blocks(100, 100, 64, bf16, False)


def test_describe_blocks_is_json_with_sympy_bucket_expression():
    import json

    import sympy

    from q3n_compile.kernels import attention_blocks as AB

    desc = A.describe_blocks(128, bf16, True, arch=9, symbol="s1")
    json.dumps(desc)  # JSON-serialisable as is
    assert desc["source"].startswith("table") and desc["key"]["arch"] == 9
    assert len(desc["buckets"]) == len(AB.BUCKET_BOUNDS)
    assert desc["buckets"][-1]["max_seq_len_k"] is None
    s1 = sympy.Symbol("s1", integer=True, nonnegative=True)
    bucket = sympy.sympify(desc["bucket_expr"], locals={"s1": s1})
    block_n = sympy.sympify(desc["block_n_expr"], locals={"s1": s1})
    for sk in (1, 64, 65, 200, 513, 4096, 4097, 16384, 20000, 10**6):
        i = AB.bucket_index(sk)
        assert int(bucket.subs(s1, sk)) == i
        assert int(block_n.subs(s1, sk)) == desc["buckets"][i]["BLOCK_N"]
        assert desc["buckets"][i]["BLOCK_N"] == AB.bucket_blocks(sk, 128, bf16, True, 9).BLOCK_N
    assert desc["decode"]["when"].startswith("Sq <= 16")
    assert "fit_shared_memory" in desc["with_mask"]  # masked calls may run fewer stages
    json.dumps(A.describe_blocks(64, f16, False, arch="interpreter"))
    assert A.describe_blocks(64, f16, False, arch="interpreter")["buckets"][0]["BLOCK_N"] == 16
    untabled = A.describe_blocks(64, f16, False, arch=8)
    assert untabled["source"].startswith("autotune") and untabled["candidates"]
    json.dumps(untabled)
    here = A.describe_blocks(64, f32, False)  # this machine's path (interpreter on the CPU lane)
    assert here["key"]["arch"] in ("interpreter", "reference") or torch.cuda.is_available()


def test_new_key_lengths_do_not_recompile():
    # The blocks are chosen inside the op from concrete sizes: one dynamic graph serves every
    # bucket and both kernels (decode and prefill).
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter, dynamic=True, fullgraph=True)
    def f(q, k, v):
        return torch.ops.q3n.attention(q, k, v, None, None, False) * 2

    gen = torch.Generator().manual_seed(15)
    # Sizes differ from each other and from the other dims (duck sizing would tie equal ones).
    for sq, sk in ((3, 20), (5, 70), (17, 33), (6, 300)):
        q, k, v = _qkv(gen, 1, 2, 1, sq, sk, 16, f32)
        torch.testing.assert_close(f(q, k, v), 2 * A.reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


# (B, Hq, Hkv, Sq, Sk, D, causal, mask?): prefill with GQA and a padding mask, a decode step, a
# short draft (split-KV kernels), a single head (where both layouts coincide).
BSHD_CASES = {
    "prefill_gqa_padding": (2, 4, 2, 37, 37, 16, True, True),
    "decode_q1": (2, 4, 2, 1, 45, 16, False, False),
    "draft_q3_causal": (1, 4, 1, 3, 21, 40, True, True),
    "one_head": (1, 1, 1, 19, 19, 16, False, False),
}


@pytest.mark.parametrize("case", list(BSHD_CASES), ids=list(BSHD_CASES))
def test_bshd_out_is_the_transposed_result(case):
    B, Hq, Hkv, Sq, Sk, D, causal, masked = BSHD_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q, k, v = _qkv(gen, B, Hq, Hkv, Sq, Sk, D, bf16)
    keep = None
    if masked:
        keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool)
        keep[-1, ..., Sk - 5:] = False
    heads_first = _check(q, k, v, keep, causal=causal)
    out = op(q, k, v, keep, None, causal, True)
    assert out.shape == (B, Sq, Hq, D) and out.is_contiguous()
    # The same kernel and arithmetic: only where each row is stored differs.
    assert torch.equal(out, heads_first.transpose(1, 2))


def test_bshd_out_fake_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(13)
    q, k, v = _qkv(gen, 1, 4, 2, 7, 9, 16, f32)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = op(fq, fk, fv, None, None, True, True)
    assert fake.shape == (1, 7, 4, 16) and fake.is_contiguous()
    torch.library.opcheck(op, (q, k, v, None, None, True, True))


def test_masked_blocks_fit_shared_memory():
    from q3n_compile.kernels import attention_blocks as AB

    hopper = 232448  # an H200's per-block opt-in limit
    entry = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)  # D128 non-causal, 8k keys
    # The figure Triton asked for with a bf16 additive mask (BERT at 8192 tokens, 2026-11-29).
    assert AB.pipelined_bytes(entry, 128, 128, 2, 2) == 294912
    assert AB.fit_shared_memory(entry, 128, 128, 2, 0, hopper) == entry  # no mask: as swept
    for mask_elem in (1, 2):  # bool (3 * 80 KiB) and bf16 masks (3 * 96 KiB) need a stage less
        assert AB.fit_shared_memory(entry, 128, 128, 2, mask_elem, hopper) == dict(entry, num_stages=2)
    short = dict(entry, BLOCK_N=64)  # 4k keys: 3 * 48 KiB with a bf16 mask fits as it is
    assert AB.fit_shared_memory(short, 128, 128, 2, 2, hopper) == short
    # A float32 mask with 256-wide keys: two stages are not enough, the key tile halves twice.
    wide = dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3)
    fitted = AB.fit_shared_memory(wide, 128, 128, 2, 4, hopper)
    assert fitted == dict(wide, BLOCK_N=64, num_stages=2)
    assert AB.pipelined_bytes(fitted, 128, 128, 2, 4) <= hopper


def test_reference_path_without_interpreter():
    code = ("""
        import torch
        from q3n_compile.kernels import attention as A, contract
        assert contract.backend_for(torch.device("cpu")) == "reference"
        g = torch.Generator().manual_seed(10)
        q = torch.randn(1, 4, 9, 16, generator=g).bfloat16()
        k = torch.randn(1, 2, 11, 16, generator=g).bfloat16()
        v = torch.randn(1, 2, 11, 16, generator=g).bfloat16()
        keep = torch.rand(9, 11, generator=g) > 0.3
        out = torch.ops.q3n.attention(q, k, v, keep, None, True)
        assert torch.equal(out, A.reference(q, k, v, keep, None, True))
        bshd = torch.ops.q3n.attention(q, k, v, keep, None, True, True)
        assert bshd.is_contiguous() and torch.equal(bshd, out.transpose(1, 2))
        print("ok")
    """)
    run_without_interpreter(code)


# ---------------------------------------------------------------------------------------------
# GPU lane: the compiled kernel at realistic lengths (float64 reference computed on the GPU).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (B, Hq, Hkv, Sq, Sk, D, dtype, causal, mask kind)
GPU_CASES = {
    "gqa32_8_causal_d128_bf16": (1, 32, 8, 4099, 4099, 128, bf16, True, None),
    "gqa32_8_d64_f16": (2, 32, 8, 1531, 1531, 64, f16, False, None),
    "padding_bool_d128_bf16": (2, 32, 8, 1003, 2049, 128, bf16, False, "padding"),
    "additive_causal_d64_f16": (1, 16, 16, 2047, 2047, 64, f16, True, "additive"),
    "bool_causal_d128_bf16": (1, 8, 2, 1999, 1999, 128, bf16, True, "bool"),
    "d80_causal_bf16": (1, 8, 8, 1037, 1037, 80, bf16, True, None),
    "d96_f16": (2, 8, 4, 1111, 1111, 96, f16, False, None),
    "d256_bf16": (1, 8, 8, 1025, 1025, 256, bf16, False, None),
    "d256_causal_f16": (1, 4, 2, 1025, 1025, 256, f16, True, "padding"),
    "f32_causal_d128": (1, 8, 8, 1029, 1029, 128, f32, True, None),
    "f32_d64_additive": (1, 8, 2, 1001, 1501, 64, f32, False, "additive"),
    "f32_d256_causal": (1, 4, 4, 1001, 1001, 256, f32, True, None),
    # An additive mask in the <= 8192-key bucket, whose table entry (swept without a mask) needs
    # a pipeline stage less to fit shared memory with the mask's tiles (BERT at 8192 did not).
    "additive_8k_bucket_d128_bf16": (1, 4, 4, 129, 5003, 128, bf16, False, "additive"),
}


def _gpu_mask(kind, gen, B, Hq, Sq, Sk):
    dev = "cuda"
    if kind == "padding":
        keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool, device=dev)
        keep[-1, ..., Sk - 300:] = False
        return keep
    if kind == "bool":
        return torch.rand(1, Hq, Sq, Sk, generator=gen, device=dev) > 0.2
    if kind == "additive":
        return torch.randn(Sq, Sk, generator=gen, device=dev)
    return None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_against_float64(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, causal, kind = GPU_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(case.encode()))
    q, k, v = _qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype, device="cuda")
    _check(q, k, v, _gpu_mask(kind, gen, B, Hq, Sq, Sk), causal=causal)


@pytest.mark.gpu
@needs_cuda
def test_gpu_non_contiguous_and_decode():
    gen = torch.Generator(device="cuda").manual_seed(11)
    B, S, Hq, Hkv, D = 2, 1543, 32, 8, 128
    q = _randn(gen, B, S, Hq, D, dtype=bf16, device="cuda").transpose(1, 2)
    kv = _randn(gen, B, S, 2, Hkv, D, dtype=bf16, device="cuda")
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    _check(q, k, v, causal=True)
    _check(q[:, :, -1:], k, v)  # one decode step over the whole cache
    _check(q[:, :, -3:].contiguous(), k, v, causal=False)
    # bshd_out: the same kernels storing [B, S, H, D], prefill and decode.
    for rows in (q, q[:, :, -1:], q[:, :, -3:]):
        bshd = op(rows, k, v, None, None, True, True)
        assert bshd.is_contiguous() and torch.equal(bshd, op(rows, k, v, None, None, True).transpose(1, 2))


@pytest.mark.gpu
@needs_cuda
def test_gpu_fully_masked_rows_are_zero():
    gen = torch.Generator(device="cuda").manual_seed(12)
    q, k, v = _qkv(gen, 1, 8, 8, 1001, 1003, 64, bf16, device="cuda")
    keep = torch.rand(1, 1, 1001, 1003, generator=gen, device="cuda") > 0.5
    keep[..., 500, :] = False
    out = op(q, k, v, keep, None, False)
    assert not torch.isnan(out).any()
    assert out[:, :, 500].abs().max() == 0
    torch.testing.assert_close(out.double(), _exact(q, k, v, keep, None, False), atol=3e-2, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_offsets_past_int32():
    # Row offsets into the mask (2999 * 800_000) and key offsets into a wide [B, S, H, D] buffer
    # (1000 * 2.4M) exceed 2^31 elements: the kernel must address them in 64 bits.
    gen = torch.Generator(device="cuda").manual_seed(13)
    Sq, Sk, D = 3000, 1000, 64
    q = _randn(gen, 1, 2, Sq, D, dtype=bf16, device="cuda")
    wide = torch.empty(1, Sk, 600, 4096, dtype=bf16, device="cuda")
    wide[:, :, 0, : 2 * D] = _randn(gen, 1, Sk, 2 * D, dtype=bf16, device="cuda")
    k = wide[:, :, 0:1, :D].transpose(1, 2)
    v = wide[:, :, 0:1, D: 2 * D].transpose(1, 2)
    big = torch.empty(Sq, 800_000, dtype=torch.bool, device="cuda")
    big[:, :Sk] = torch.rand(Sq, Sk, generator=gen, device="cuda") > 0.3
    keep = big[:, :Sk]
    assert (Sq - 1) * keep.stride(0) > 2**31 and (Sk - 1) * k.stride(2) > 2**31
    _check(q, k, v, keep)
    del wide, big


def test_64bit_offsets_rule_and_path(monkeypatch, fresh_plans):
    cfg = dict(BLOCK_M=128, BLOCK_N=64)
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(1, 32, 4096, 128, **meta)
    out = torch.empty(1, 32, 4096, 128, **meta)
    assert not A._needs_64bit_offsets(q, q, q, q, out, cfg)
    wide_k = torch.empty(1, 600_000, 32, 128, **meta).transpose(1, 2)  # 600k keys, [B, S, H, D]
    assert A._needs_64bit_offsets(q, wide_k, wide_k, q, out, cfg)
    q_long = torch.empty(1, 32, 50_000, 128, **meta)  # a [S, S] mask at S = 50k: 2.5e9 elements
    square = torch.empty(50_000, 50_000, dtype=torch.bool, device="meta").expand(1, 32, -1, -1)
    assert not A._needs_64bit_offsets(q_long, q_long, q_long, q_long, q_long, cfg)
    assert A._needs_64bit_offsets(q_long, q_long, q_long, square, q_long, cfg)
    # The int64 variant itself, on small inputs (the GPU lane also runs it past 2^31).
    monkeypatch.setattr(A, "_needs_64bit_offsets", lambda *args: True)
    gen = torch.Generator().manual_seed(14)
    q, k, v = _qkv(gen, 1, 2, 1, 19, 21, 16, f16)
    _check(q, k, v, torch.rand(19, 21, generator=gen) > 0.3, causal=True)


def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emit_table_from_a_sweep(tmp_path):
    # What `bench_attention.py --emit-table sweep.json [--apply]` does with an H200 sweep.
    from q3n_compile.kernels import attention_blocks as AB

    bench = _bench_module()

    def row(S, D, causal, best):
        m, n, w, st = best
        return dict(S=S, D=D, causal=causal, best=dict(BLOCK_M=m, BLOCK_N=n, num_warps=w,
                                                       num_stages=st, tflops=400.0))

    sweep = dict(gpu="NVIDIA H200", capability=[9, 0], date="2026-12-01T00:00:00", commit="abc",
                 rows=[row(512, 128, False, (64, 64, 4, 3)), row(16384, 128, False,
                                                                 (128, 128, 8, 2)),
                       row(4096, 64, True, (128, 32, 4, 3)), dict(S=64, D=64, causal=True,
                                                                  best=None)])
    literal = bench.table_literal([sweep])
    scope = {}
    exec(literal, scope)  # a valid Python literal, as pasted into attention_blocks.py
    table = scope["TABLE_16BIT"]
    assert "swept: NVIDIA H200 2026-12-01 commit abc" in scope["TABLE_16BIT_SOURCE"]
    assert set(table) == set(AB.TABLE_16BIT)
    assert table[(9, 128, False)][AB.bucket_index(512)] == (64, 64, 4, 3)
    assert table[(9, 128, False)][AB.bucket_index(16384)] == (128, 128, 8, 2)
    assert table[(9, 128, False)][-1] == (128, 128, 8, 2)  # the open bucket follows the longest
    assert table[(9, 64, True)][AB.bucket_index(4096)] == (128, 32, 4, 3)
    assert table[(9, 64, True)][-1] == (128, 32, 4, 3)
    # Unswept buckets and keys keep their current entries.
    assert table[(9, 128, False)][0] == AB.TABLE_16BIT[(9, 128, False)][0]
    assert table[(9, 256, True)] == AB.TABLE_16BIT[(9, 256, True)]
    assert "swept at S=512: 400 TFLOP/s" in literal and "not swept" in literal
    # --apply replaces exactly the generated block of the module's source.
    target = tmp_path / "attention_blocks.py"
    source = Path(AB.__file__).read_text()
    target.write_text(source)
    bench.apply_table(literal, target)
    applied = target.read_text()
    assert literal in applied and applied.count("# BEGIN GENERATED TABLE_16BIT") == 1
    assert applied.replace(literal, "") == source.replace(
        source[source.index("# BEGIN GENERATED"):source.index("# END GENERATED TABLE_16BIT\n")
               + len("# END GENERATED TABLE_16BIT\n")], "")
