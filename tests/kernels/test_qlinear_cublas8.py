"""q3n::qlinear's cublas8 path (weight codes unpacked to 8 bits, cuBLAS's int8/fp8 GEMMs) against
float64 (CPU lane: the unpack and epilogue kernels in Triton's interpreter, torch's CPU int8 and
row-wise fp8 GEMMs; GPU: -m gpu, cuBLAS's block-scaled fp8 GEMM too)."""

import pytest
import torch

from q3n_compile.kernels import packing as P
from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_cublas8 as C8

from .test_qlinear import TOL, _gen, _packed, bf16
from .test_qlinear import _check as check_against_float64

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

CUBLAS8 = dict(path="cublas8")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check(x, pw, bias, act, ag=Q.PER_TOKEN):
    """The forced cublas8 launch against float64 (tests/kernels/test_qlinear.py's check: bf16
    output, one rounding, and the fp8 path's bias add one more, within its 2e-2)."""
    return check_against_float64(x, pw, bias, act=act, path=CUBLAS8, ag=ag)


FORMATS = [(2, 32, False), (3, -1, True), (4, 64, False), (5, 32, True), (6, -1, False),
           (7, 32, False), (8, -1, True), (8, 128, True)]
# e4m3 holds integers up to 16 exactly: fp8 takes codes of at most 4 bits.
UNPACK_CASES = [(b, g, s, dt) for b, g, s in FORMATS
                for dt in (torch.int8, torch.float16, torch.float8_e4m3fn)
                if dt != torch.float8_e4m3fn or b <= 4]


@pytest.mark.parametrize("bits,group,sym,dtype", UNPACK_CASES,
                         ids=[f"w{b}g{g}{'s' if s else 'a'}_{str(dt)[6:]}"
                              for b, g, s, dt in UNPACK_CASES])
def test_unpack_is_exact(bits, group, sym, dtype):
    N, K = 40, 256 + 32 * (group == -1)  # N off the 64-column block, K off the 128-channel one
    gen = _gen(f"unpack{bits}{group}{sym}")
    pw = _packed(gen, N, K, bits, group, sym)
    codes = P.unpack_codes(pw.qweight, bits, K).to(torch.int64)
    g = torch.zeros(K, dtype=torch.long) if group == -1 else torch.arange(K) // group
    z = torch.full((int(g.max()) + 1, N), 1 << (bits - 1)) if sym else pw.zeros.long()
    want = codes - z[g].t()
    w8 = C8.unpack_codes_8bit(pw.qweight, pw.zeros, bits, group, K, dtype, interpreter=True)
    assert w8.shape == (N, K) and w8.dtype == dtype and w8.is_contiguous()
    assert torch.equal(w8.to(torch.int64), want)


@pytest.mark.parametrize("M,N,K", [(17, 48, 64), (40, 80, 208), (3, 32, 64)])
@pytest.mark.parametrize("bits", [8, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_path_against_float64(M, N, K, bits, bias):
    gen = _gen(f"i8{M}{N}{K}{bits}{bias}")
    pw = _packed(gen, N, K, bits, -1, bits == 8)
    x = (torch.randn(M, K, generator=gen) * 3).to(bf16)
    _check(x, pw, torch.randn(N, generator=gen).to(bf16) if bias else None, "int8")


@pytest.mark.parametrize("sym", [True, False])
def test_fp8_rowwise_path_against_float64(sym):
    # Per-channel weights and per-token activations: row-wise scales (torch's CPU fp8 GEMM takes
    # them; the block-scaled form is in the GPU lane).
    gen = _gen(f"f8row{sym}")
    pw = _packed(gen, 48, 96, 4, -1, sym)
    x = torch.randn(33, 96, generator=gen).to(bf16)
    args = (x, pw.qweight, pw.scales, pw.zeros, None, None, 4, -1, 96, "fp8")
    codes, xs = Q.quantize_activations(x, "fp8")
    out = C8.run(codes.to(torch.float8_e4m3fn), xs, pw.qweight, pw.scales, pw.zeros, None, 4, -1,
                 "fp8", Q.PER_TOKEN, bf16)
    exact = Q.reference(x.double(), *args[1:])
    assert (out.double() - exact).abs().max().item() <= TOL[bf16] * exact.abs().max().item()


def test_eligible_reasons():
    ok = dict(N=4096, K=4096, bits=4, group_size=128, act="fp8", out_dtype=bf16,
              fp8_hardware=True, act_group_size=-1)
    assert C8.eligible(**ok) is None
    assert C8.eligible(**dict(ok, act_group_size=128)) is None
    assert C8.eligible(**dict(ok, group_size=-1, K=4112)) is None  # row-wise: K % 16
    cases = [
        (dict(out_dtype=torch.float16), "bfloat16"),
        (dict(N=4100), "N a multiple of 16"),
        (dict(fp8_hardware=False), "without fp8 tensor cores"),
        (dict(bits=6), "not exact in e4m3"),
        (dict(group_size=64), "per 128 channels"),
        (dict(act_group_size=32), "per 128 channels"),
        (dict(K=4160), "K a multiple of 128"),
        (dict(act="int8", bits=8), "per-channel weights"),
        (dict(act="int8", bits=8, group_size=-1, act_group_size=128), "per-token"),
        (dict(act="int8", bits=8, group_size=-1, K=4104), "multiple of 16"),
        (dict(act="int12"), "int8 or fp8"),
    ]
    for change, reason in cases:
        got = C8.eligible(**dict(ok, **change))
        assert got is not None and reason in got, (change, got)
    assert C8.eligible(**dict(ok, act="int8", bits=8, group_size=-1)) is None


def test_choose_path_takes_cublas8_where_eligible(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(Q, "fp8_supported", lambda device: True)
    big = dict(dtype=bf16, device=cuda, sm_count=132)
    assert Q.choose_path(4096, 4096, 4096, 4, 128, "fp8", **big)["path"] == "cublas8"
    assert Q.choose_path(4096, 4096, 4096, 8, -1, "int8", **big)["path"] == "cublas8"
    # Not exact or not cuBLAS's scale layout: dequantise + cuBLAS as before.
    assert Q.choose_path(4096, 4096, 4096, 8, 128, "int8", **big)["path"] == "dequant"
    assert Q.choose_path(4096, 4096, 4096, 6, 128, "fp8", **big)["path"] == "dequant"
    assert Q.choose_path(4096, 4096, 4096, 4, 128, "fp8", dtype=torch.float16, device=cuda,
                         sm_count=132)["path"] == "dequant"
    assert Q.choose_path(4096, 4096, 4096, 4, 128, "none", **big)["path"] == "dequant"
    # From CUBLAS8_MIN_M rows: fp8 from 65 (mm8 from 65 to 128 rows where its tiles fill the
    # SMs twice: per-token scales, 4-bit weights), int8 above 256 (below); below, the Triton
    # tiles.
    assert Q.choose_path(256, 4096, 4096, 4, 128, "fp8", **big)["path"] == "cublas8"
    assert Q.choose_path(255, 4096, 4096, 4, 128, "fp8", **big)["path"] == "cublas8"
    assert Q.choose_path(64, 4096, 4096, 4, 128, "fp8", **big)["path"] == "mmT"
    assert Q.choose_path(255, 4096, 4096, 4, 128, "int8", **big)["path"] == "mm"
    for m, n in ((65, 8448), (128, 12288), (100, 28672)):  # >= 264 tiles of 128 x 32
        cfg = Q.choose_path(m, n, 4096, 4, 128, "fp8", **big)
        assert cfg == dict(path="mm8", **Q.MM8_TILE, SPLIT_K=1), (m, n, cfg)
    # 99-132 tiles (0.75-1 of the SMs) with >= 32 K blocks: K split 4 ways.
    for m, n, k in ((65, 4096, 4096), (128, 4096, 12288), (100, 3168, 4096)):
        cfg = Q.choose_path(m, n, k, 4, 128, "fp8", **big)
        assert cfg == dict(path="mm8", **Q.MM8_TILE, SPLIT_K=4), (m, n, k, cfg)
    for m, n, k in ((65, 8416, 4096),  # 263 tiles
                    (65, 3136, 4096),  # 98 tiles
                    (65, 4096, 3968)):  # 31 K blocks
        assert Q.choose_path(m, n, k, 4, 128, "fp8", **big)["path"] == "cublas8", (m, n, k)
    assert Q.choose_path(129, 12288, 4096, 4, 128, "fp8", **big)["path"] == "cublas8"
    assert Q.choose_path(128, 12288, 4096, 4, 128, "fp8", act_group_size=128,
                         **big)["path"] == "cublas8"
    # Per-channel weights (row-scaled cuBLAS, not measured below 256 rows): from 256.
    assert Q.choose_path(128, 12288, 4096, 4, -1, "fp8", **big)["path"] == "mmT"
    assert Q.choose_path(255, 12288, 4096, 4, -1, "fp8", **big)["path"] == "mm"
    assert Q.choose_path(256, 12288, 4096, 4, -1, "fp8", **big)["path"] == "cublas8"
    # int8: from 257 rows, from 65 on weights of at most 4096^2 entries (s25run3-5).
    assert Q.choose_path(256, 5120, 5120, 8, -1, "int8", **big)["path"] == "mm"
    assert Q.choose_path(257, 5120, 5120, 8, -1, "int8", **big)["path"] == "cublas8"
    assert Q.choose_path(65, 4096, 4096, 8, -1, "int8", **big)["path"] == "cublas8"
    assert Q.choose_path(256, 4096, 4096, 8, -1, "int8", **big)["path"] == "cublas8"
    assert Q.choose_path(64, 4096, 4096, 8, -1, "int8", **big)["path"] == "mmT"
    monkeypatch.setattr(Q, "fp8_supported", lambda device: False)
    assert Q.choose_path(4096, 4096, 4096, 4, 128, "fp8", **big)["path"] == "dequant"


def test_forced_path_that_does_not_apply_says_why():
    gen = _gen("forced")
    pw = _packed(gen, 48, 128, 4, 32, False)
    x = torch.randn(20, 128, generator=gen).to(bf16)
    with pytest.raises(ValueError, match="cublas8 path does not take this call.*per-channel"):
        Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 32, 128, "int8",
                  interpreter=True, path=CUBLAS8)


# ---------------------------------------------------------------------------------------------
# GPU lane: cuBLAS's block-scaled fp8 GEMM, model widths, odd M


GPU_CASES = [  # bits, group, sym, act, act_group
    (4, 128, False, "fp8", -1),
    (4, 128, True, "fp8", 128),
    (4, -1, False, "fp8", -1),
    (4, -1, True, "fp8", 128),
    (2, 128, False, "fp8", -1),
    (8, -1, True, "int8", -1),
    (6, -1, False, "int8", -1),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [17, 1000, 4096])
@pytest.mark.parametrize("bits,group,sym,act,ag", GPU_CASES,
                         ids=[f"w{b}g{g}{'s' if s else 'a'}_{a}_ag{ag}"
                              for b, g, s, a, ag in GPU_CASES])
def test_gpu_against_float64(bits, group, sym, act, ag, M):
    if act == "fp8" and not Q.fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores on this GPU")
    N, K = 4096, 4096
    gen = _gen(f"gpu8{bits}{group}{act}{ag}{M}")
    pw = _packed(gen, N, K, bits, group, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    bias = torch.randn(N, generator=gen).to(bf16).cuda() if M != 1000 else None
    _check(x, pw, bias, act, ag)


@pytest.mark.gpu
@needs_cuda
def test_gpu_dispatch_takes_cublas8_at_large_m():
    if not Q.fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores on this GPU")
    cfg = Q.choose_path(4096, 4096, 4096, 4, 128, "fp8", bf16, torch.device("cuda"))
    assert cfg["path"] == "cublas8"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M,N,path", [(65, 3136, "cublas8"), (100, 12288, "mm8"),
                                      (128, 8448, "mm8"), (77, 4096, "mm8")])
def test_gpu_dispatch_from_65_rows_against_float64(M, N, path):
    # The dispatch on fp8 codes from 65 rows without the wg tile (cublas8, or mm8 where its
    # tiles fill the SMs, split 4 ways at 4096 columns; on sm_90 the wg tile takes these calls
    # since session 17, tests/kernels/test_qlinear_wgmma.py), from bf16 x, with a bias.
    if not Q.fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores on this GPU")
    K = 4096
    cfg = Q.choose_path(M, N, K, 4, 128, "fp8", bf16, torch.device("cuda"), allow_wg=False)
    assert cfg["path"] == path
    gen = _gen(f"gpu65{M}{N}")
    pw = _packed(gen, N, K, 4, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    check_against_float64(x, pw, torch.randn(N, generator=gen).to(bf16).cuda(), act="fp8",
                          path=cfg)
