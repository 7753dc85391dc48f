"""q3n::sparse_attention: dense at keep=1, the selection it promises, the measured fallback.

CPU lane: the Triton interpreter, blocks of 16. GPU lane (``-m gpu``): blocks of 64, longer inputs.
The float64 references here are written independently of the module: they take the kernel's
index lists and rebuild the kept keys with Python loops.
"""

import math
import zlib

import pytest
import torch

import q3n_compile
from q3n_compile import report
from q3n_compile.kernels import attention as A
from q3n_compile.kernels import attention_sparse as S

op = torch.ops.q3n.sparse_attention

# Triton 3.6's interpreter turns each runtime loop bound into an int through a 1-element array.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
# Max |kernel - float64| on O(1) outputs, as for q3n::attention (same rounding).
TOL = {f32: 2e-5, f16: 5e-3, bf16: 3e-2}


def _randn(gen, *shape, dtype=f32, device="cpu", std=1.0):
    return (std * torch.randn(*shape, generator=gen, device=device)).to(dtype)


def _qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype=f32, device="cpu"):
    return (_randn(gen, B, Hq, Sq, D, dtype=dtype, device=device),
            _randn(gen, B, Hkv, Sk, D, dtype=dtype, device=device),
            _randn(gen, B, Hkv, Sk, D, dtype=dtype, device=device))


def _dense64(q, k, v, mask, scale, causal):
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return A.reference(q.double(), k.double(), v.double(), m, scale, causal)


def _kept_sets(sel):
    """{(b, h, i): sorted kept key blocks} from the lists, honouring the dense decision."""
    idx, counts, allowed = sel.idx.cpu(), sel.counts.cpu(), sel.allowed.cpu()
    dense = bool(sel.dense)
    B, H, nQ, _ = idx.shape
    return {(b, h, i): (list(range(int(allowed[i]))) if dense
                        else sorted(int(x) for x in idx[b, h, i, :int(counts[i])]))
            for b in range(B) for h in range(H) for i in range(nQ)}


def _blocks64(q, k, v, mask, scale, causal, kept, block):
    """float64 attention over the keys of the kept blocks only (masks and causality on top)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    keys = torch.zeros(B, Hq, Sq, Sk, dtype=torch.bool, device=q.device)
    for (b, h, i), blocks in kept.items():
        for j in blocks:
            keys[b, h, i * block:(i + 1) * block, j * block:(j + 1) * block] = True
    g = Hq // Hkv
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    s = s.masked_fill(~keys, -math.inf)
    dead = s.amax(-1, keepdim=True) == -math.inf
    p = torch.softmax(s.masked_fill(dead, 0), -1).masked_fill(dead, 0)
    return p @ vv


def _err(out, want):
    return (out.double() - want).abs().max().item()


# --------------------------------------------------------------------------------------------
# keep = 1: every allowed block is kept, the result is dense attention
# --------------------------------------------------------------------------------------------

# (B, Hq, Hkv, Sq, Sk, D, dtype, causal, mask); lengths off the 16-row blocks, >= 4 key blocks.
KEEP_ALL = {
    "odd_causal_f32": (1, 2, 2, 67, 67, 16, f32, True, None),
    "gqa_noncausal_f16": (2, 4, 2, 37, 83, 32, f16, False, None),
    "gqa_causal_bf16": (1, 4, 1, 53, 53, 40, bf16, True, None),
    "padding_bool_f16": (2, 2, 2, 49, 71, 16, f16, False, "padding"),
    "additive_causal_f32": (1, 2, 1, 50, 65, 16, f32, True, "additive"),
    "long_q_causal_bf16": (1, 2, 2, 81, 64, 16, bf16, True, "bool"),
}


def _mask(kind, gen, B, Hq, Sq, Sk, device="cpu"):
    if kind == "padding":
        keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool, device=device)
        keep[-1, ..., Sk - 30:] = False  # two whole key blocks and part of a third
        return keep
    if kind == "bool":
        return torch.rand(1, Hq, Sq, Sk, generator=gen, device=device) > 0.3
    if kind == "additive":
        return torch.randn(Sq, Sk, generator=gen, device=device)
    return None


@pytest.mark.parametrize("case", list(KEEP_ALL), ids=list(KEEP_ALL))
def test_keep_one_is_dense(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, causal, kind = KEEP_ALL[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q, k, v = _qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype)
    mask = _mask(kind, gen, B, Hq, Sq, Sk)
    out = op(q, k, v, mask, None, causal, 1.0, 0.95)
    assert out.shape == (B, Hq, Sq, D) and out.dtype == dtype
    assert not torch.isnan(out).any()
    err = _err(out, _dense64(q, k, v, mask, None, causal))
    assert err <= TOL[dtype], f"max abs err {err:.3g} > {TOL[dtype]:.3g}"
    # It ran the sparse branch with full lists, not the dense fallback or the short path.
    sel = S.select(q, k, mask, 1 / math.sqrt(D), causal, 1.0, 0.95)
    assert int(sel.dense) == 0
    assert torch.equal(sel.counts.long(), sel.allowed)


# --------------------------------------------------------------------------------------------
# keep = 0.2 on inputs whose attention sits on a few key blocks
# --------------------------------------------------------------------------------------------


def _concentrated(gen, B, Hq, Hkv, Sq, Sk, D, hot, dtype=f32, device="cpu"):
    """q and the keys of the `hot` blocks share a strong direction: those blocks take the
    attention weight (logit advantage ~7 at D=32)."""
    q, k, v = _qkv(gen, B, Hq, Hkv, Sq, Sk, D, f32, device)
    q, k = 0.3 * q, 0.3 * k
    q[..., 0] += 5.0
    for j in hot:
        k[:, :, j * 16:(j + 1) * 16, 0] += 8.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_concentrated_attention_keeps_hot_blocks_gqa(dtype):
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 2, 45, 301, 32  # 19 key blocks: lists of ceil(0.2 * 19) = 4
    q, k, v = _concentrated(gen, B, Hq, Hkv, Sq, Sk, D, hot=(5, 11), dtype=dtype)
    sel = S.select(q, k, None, 1 / math.sqrt(D), False, 0.2, 0.95)
    kept = _kept_sets(sel)
    # Not causal: the diagonal is bottom-right, key row + Sk - Sq (blocks 16, 17, 18 here).
    assert all(blocks == [0, 5, 11, 16 + i] for (b, h, i), blocks in kept.items()), kept
    assert int(sel.dense) == 0 and float(sel.mass) >= 0.95
    out = op(q, k, v, None, None, False, 0.2, 0.95)
    want = _blocks64(q, k, v, None, None, False, kept, 16)
    err = _err(out, want)
    assert err <= TOL[dtype], err
    # The blocks left out held weight (~1%): the selection changes the result.
    dense = _dense64(q, k, v, None, None, False)
    assert (want - dense).abs().max().item() > 1e-3
    if dtype == f32:
        assert _err(out, dense) > 10 * TOL[dtype]


def test_causal_selection_first_diagonal_and_mass():
    gen = torch.Generator().manual_seed(22)
    B, H, S_, D = 1, 2, 313, 32  # 20 blocks; lists grow from 1 to ceil(0.2 * 20) = 4
    q, k, v = _concentrated(gen, B, H, H, S_, S_, D, hot=(3, 7))
    sel = S.select(q, k, None, 1 / math.sqrt(D), True, 0.2, 0.0)
    kept = _kept_sets(sel)
    for (b, h, i), blocks in kept.items():
        assert blocks[0] == 0 and blocks[-1] == i, (i, blocks)  # first, diagonal, nothing above
        n = max(2 if i else 1, math.ceil(0.2 * (i + 1) - 1e-9))
        assert len(blocks) == min(i + 1, n), (i, blocks)
        if len(blocks) > 2:  # room beyond the forced blocks: the hot ones come first
            assert 3 in blocks or 7 in blocks, (i, blocks)
    assert int(sel.dense) == 0  # min_mass = 0: always sparse
    out = op(q, k, v, None, None, True, 0.2, 0.0)
    want = _blocks64(q, k, v, None, None, True, kept, 16)
    assert _err(out, want) <= TOL[f32]
    # The measured mass is the float64 softmax over all keys summed over the kept blocks.
    full = torch.softmax((q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).masked_fill(
        torch.ones(S_, S_, dtype=torch.bool).triu(1), -math.inf), -1)
    rows = list(sel.rows)
    assert len(rows) >= 4 and rows[-1] // 16 == (S_ - 1) // 16  # the last block is sampled
    for r_i, r in enumerate(rows):
        keys = torch.zeros(S_, dtype=torch.bool)
        for j in kept[(0, 0, r // 16)]:
            keys[j * 16:(j + 1) * 16] = True
        want_mass = full[0, 0, r][keys].sum().item()
        assert abs(sel.mass_rows[0, 0, r_i].item() - want_mass) < 1e-4, (r, want_mass)


def test_mask_emptied_block_is_not_chosen():
    gen = torch.Generator().manual_seed(23)
    B, Hq, Hkv, Sq, Sk, D = 2, 2, 2, 40, 301, 32
    q, k, v = _concentrated(gen, B, Hq, Hkv, Sq, Sk, D, hot=(5, 11))
    keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool)
    keep[1, ..., 11 * 16:12 * 16] = False  # batch 1 cannot see hot block 11
    sel = S.select(q, k, keep, 1 / math.sqrt(D), False, 0.2, 0.0)
    kept = _kept_sets(sel)
    assert all(11 in blocks for (b, h, i), blocks in kept.items() if b == 0)
    assert all(11 not in blocks and 5 in blocks for (b, h, i), blocks in kept.items() if b == 1)
    out = op(q, k, v, keep, None, False, 0.2, 0.0)
    want = _blocks64(q, k, v, keep, None, False, kept, 16)
    assert _err(out, want) <= TOL[f32]


# --------------------------------------------------------------------------------------------
# The measured fallback, the statistics, the short path
# --------------------------------------------------------------------------------------------


def test_flat_attention_falls_back_to_dense_and_reports_mass():
    gen = torch.Generator().manual_seed(24)
    B, Hq, Hkv, Sq, Sk, D = 1, 2, 1, 70, 70, 16
    q, k, v = _qkv(gen, B, Hq, Hkv, Sq, Sk, D)
    dense = _dense64(q, k, v, None, None, True)
    out = op(q, k, v, None, None, True, 0.2, 0.95, 7, 3)
    assert _err(out, dense) <= TOL[f32]
    stats = report.sparse_attention_stats(7)
    (layer,) = stats["layers"]
    assert layer["layer"] == 3 and layer["ran"] == "dense"
    assert 0.3 < layer["kept_mass"] < 0.95 and layer["kept_mass_min_head"] <= layer["kept_mass"]
    assert layer["q_len"] == 70 and layer["block"] == 16 and layer["min_mass"] == 0.95
    assert 0 < layer["work_fraction_if_sparse"] < 1

    # The same inputs with min_mass = 0 run sparse: the result is the block-restricted one.
    out = op(q, k, v, None, None, True, 0.2, 0.0, 7, 3)
    (layer,) = report.sparse_attention_stats(7)["layers"]  # the latest call replaced the first
    assert layer["ran"] == "sparse" and layer["min_mass"] == 0.0
    sel = S.select(q, k, None, 1 / math.sqrt(D), True, 0.2, 0.0)
    want = _blocks64(q, k, v, None, None, True, _kept_sets(sel), 16)
    assert _err(out, want) <= TOL[f32]
    assert _err(out, dense) > 100 * TOL[f32]


def test_short_inputs_run_dense_and_record_nothing():
    gen = torch.Generator().manual_seed(25)
    for Sq, Sk in ((5, 200), (40, 47)):  # decode-sized queries; 3 key blocks
        q, k, v = _qkv(gen, 1, 2, 2, Sq, Sk, 16)
        out = op(q, k, v, None, None, False, 0.2, 0.95, 8, 0)
        assert _err(out, _dense64(q, k, v, None, None, False)) <= TOL[f32]
    assert report.sparse_attention_stats(8) is None
    assert S.is_short(17, 64, 16) is False and S.is_short(16, 4096, 16) and S.is_short(99, 48, 16)


def test_reference_path_matches_kernel():
    gen = torch.Generator().manual_seed(26)
    q, k, v = _concentrated(gen, 1, 2, 1, 45, 140, 32, hot=(4,), dtype=bf16)
    keep = torch.rand(45, 140, generator=gen) > 0.2
    out = op(q, k, v, keep, 0.2, True, 0.2, 0.0, 9, 0)
    ref = S.reference(q, k, v, keep, 0.2, True, 0.2, 0.0, 9, 1)
    assert ref.dtype == bf16
    assert (out.double() - ref.double()).abs().max().item() <= TOL[bf16]
    layers = report.sparse_attention_stats(9)["layers"]
    assert [(x["layer"], x["backend"]) for x in layers] == [(0, "interpreter"), (1, "reference")]
    assert layers[0]["kept_mass"] == pytest.approx(layers[1]["kept_mass"], abs=1e-6)
    q3n_compile.reset_reports()
    assert report.sparse_attention_stats(9) is None


def _launching_ops(fn) -> int:
    """How many non-view ATen ops `fn` runs (each a kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("causal", [True, False])
def test_selection_reuses_its_layout(causal):
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(1, 8, 300, 32, generator=gen)
    k = torch.randn(1, 2, 300, 32, generator=gen)

    def select():
        return S.select(q, k, None, 0.2, causal, 0.3, 0.95, block=16)

    S._LAYOUTS.clear()
    first_ops = _launching_ops(select)  # builds the signature's layout
    first = select()
    again_ops = _launching_ops(select)
    again = select()
    # The second call launches only what reads q and k.
    # Measured: 80 then 42 at this ragged length (300 rows: the tail block adds its own ops).
    assert first_ops - again_ops >= 30 and again_ops <= 45
    for field in ("idx", "counts", "allowed", "mass_rows", "mass", "dense"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert first.rows == again.rows


def test_supports_reasons_and_symbolic_fake():
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic, ShapeEnv, StatelessSymbolicContext, statically_known_true)

    q, k, v = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    assert S.supports(q, k, v) is None
    assert "keep=0" in S.supports(q, k, v, keep=0)
    assert "min_mass=1.5" in S.supports(q, k, v, min_mass=1.5)
    assert "not a multiple" in S.supports(q, k[:, :1].expand(1, 3, 70, 16), v[:, :1].expand(1, 3, 70, 16))
    assert "dtype" in S.supports(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="q3n::sparse_attention: keep="):
        op(q, k, v, None, None, False, 1.5, 0.95)

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def sym(t, name):
        dims = [DimDynamic.DYNAMIC if i == 2 else DimDynamic.STATIC for i in range(4)]
        return mode.from_tensor(t, source=ConstantSource(name),
                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    fq, fk, fv = sym(q, "q"), sym(k, "k"), sym(v, "v")
    with mode:
        assert S.supports(fq, fk, fv, None, None, True, 0.2, 0.95) is None
        out = op(fq, fk, fv, None, None, True, 0.2, 0.95, 0, 0)
    assert isinstance(out.shape[2], torch.SymInt)
    assert statically_known_true(out.shape[2] == fq.shape[2]) and out.shape[3] == 16


def test_opcheck():
    """Schema, fake vs real, and AOT dispatch (dynamic too) on a sparse-eligible input."""
    gen = torch.Generator().manual_seed(27)
    q, k, v = _qkv(gen, 1, 2, 1, 17, 64, 16)
    keep = torch.rand(17, 64, generator=gen) > 0.2
    torch.library.opcheck(op, (q, k, v, keep, None, True, 0.2, 0.0, -1, -1))


def test_choose_config_and_block_size():
    assert S.block_size(torch.device("cuda", 0)) == 64 and S.block_size(torch.device("cpu")) == 16
    assert S.choose_config(128, bf16) == dict(num_warps=4, num_stages=3)
    assert S.choose_config(256, f32)["num_stages"] == 1


# --------------------------------------------------------------------------------------------
# GPU lane
# --------------------------------------------------------------------------------------------

GPU_CASES = {
    # (B, Hq, Hkv, S, D, dtype, causal)
    "causal_gqa_bf16": (1, 8, 2, 2049, 128, bf16, True),
    "noncausal_f16": (2, 4, 4, 1531, 64, f16, False),
    "causal_d256_bf16": (1, 4, 4, 1100, 256, bf16, True),
    "causal_f32": (1, 4, 2, 1029, 128, f32, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_keep_one_and_locality(case):
    B, Hq, Hkv, S_, D, dtype, causal = GPU_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(case.encode()))
    q, k, v = _qkv(gen, B, Hq, Hkv, S_, S_, D, dtype, device="cuda")
    err = _err(op(q, k, v, None, None, causal, 1.0, 0.95), _dense64(q, k, v, None, None, causal))
    assert err <= TOL[dtype], err
    # Locality: q/k from a smooth positional signal, so each row attends near itself.
    pos = torch.arange(S_, device="cuda", dtype=torch.float32)[:, None]
    freqs = torch.exp(-torch.arange(D // 2, device="cuda") / (D // 2) * math.log(1000.0)) * 0.05
    sig = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], -1) * 4.0
    qs = (sig + 0.3 * _randn(gen, B, Hq, S_, D, device="cuda")).to(dtype)
    ks = (sig + 0.3 * _randn(gen, B, Hkv, S_, D, device="cuda")).to(dtype)
    sel = S.select(qs, ks, None, 1 / math.sqrt(D), causal, 0.2, 0.0)
    assert sel.block == 64 and int(sel.dense) == 0
    out = op(qs, ks, v, None, None, causal, 0.2, 0.0)
    kept = _kept_sets(sel)
    assert all(b[0] == 0 and i in b for (_, _, i), b in kept.items())  # first and diagonal
    want = _blocks64(qs, ks, v, None, None, causal, kept, 64)
    # The positional signal makes logits of ~100, not ~1 as with random q/k: a float32 kernel's
    # rounding of q.k grows with that magnitude (error ~ eps * sum|q_i k_i|), so the bound does too.
    kv_rep = ks.double().repeat_interleave(Hq // Hkv, dim=1)
    logit_max = (qs.double() @ kv_rep.transpose(-1, -2)).abs().max().item() / math.sqrt(D)
    assert _err(out, want) <= TOL[dtype] * max(1.0, logit_max / 10)


@pytest.mark.gpu
def test_gpu_fallback_and_cuda_graph_statistics():
    gen = torch.Generator(device="cuda").manual_seed(31)
    q, k, v = _qkv(gen, 1, 8, 2, 2048, 2048, 128, bf16, device="cuda")
    out = op(q, k, v, None, None, True, 0.2, 0.95, 99, 0)  # flat attention: dense
    assert _err(out, _dense64(q, k, v, None, None, True)) <= TOL[bf16]
    first = report.sparse_attention_stats(99)["layers"][0]
    assert first["ran"] == "dense" and first["kept_mass"] < 0.95
    # Captured once, replayed on other data: the statistics follow the replay.
    static = [x.clone() for x in (q, k, v)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = op(*static, None, None, True, 0.2, 0.0, 99, 0)
    q2, k2, v2 = _qkv(gen, 1, 8, 2, 2048, 2048, 128, bf16, device="cuda")
    for dst, src in zip(static, (q2, k2, v2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    replayed = report.sparse_attention_stats(99)["layers"][0]
    sel = S.select(q2, k2, None, 1 / math.sqrt(128), True, 0.2, 0.0)
    assert replayed["ran"] == "sparse"
    assert replayed["kept_mass"] == pytest.approx(float(sel.mass), abs=1e-3)
    want = _blocks64(q2, k2, v2, None, None, True, _kept_sets(sel), 64)
    assert _err(g_out, want) <= TOL[bf16]
