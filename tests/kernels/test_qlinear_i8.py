"""q3n::qlinear's i8 path (W8A8 per channel and token on a K-major int8 weight) against float64:
the K-major layout's round trip, both tile forms and K splits in Triton's interpreter, the
codes entry point, the checks' messages, the launch rule, the quantize pass choosing the layout;
the GPU lane (-m gpu) at model widths on the dispatched launches."""

import re

import pytest
import torch

import q3n_compile
from q3n_compile.kernels import packing as P
from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_i8 as I8

from .test_qlinear import _check, _gen, _packed, bf16, f16, f32

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def _kmajor(gen, N, K, device="cpu"):
    return P.to_kmajor8(_packed(gen, N, K, 8, P.PER_CHANNEL, True)).to(device)


def _path(swap, bm=16, bn=32, bk=32, split=1, group_m=2):
    return dict(path="i8", SWAP=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
                SPLIT_K=split, num_warps=4, num_stages=1)


def test_kmajor_layout_round_trip_every_code():
    # Every 8-bit code in every column position; K = 100 pads to 128 channels of zeros.
    codes = torch.arange(256 * 3).reshape(3, 256)[:, :100].clone() % 256
    codes = torch.cat([codes, (codes + 77) % 256])  # [6, 100]
    scales = torch.rand(1, 6).half() + 0.01
    pw = P.pack(codes, scales, None, 8, P.PER_CHANNEL)
    kw = P.to_kmajor8(pw)
    assert kw.qweight.dtype == torch.int8 and tuple(kw.qweight.shape) == (6, 128)
    assert torch.equal(kw.qweight[:, :100].to(torch.int64), codes - 128)
    assert not kw.qweight[:, 100:].any()
    assert torch.equal(P.unpack_codes(kw.qweight, 8, 100), codes.to(torch.uint8))
    assert torch.equal(kw.dequantize(torch.float64), pw.dequantize(torch.float64))
    assert kw.nbytes == pw.nbytes  # the same bytes, transposed
    assert P.out_features(kw.qweight) == P.out_features(pw.qweight) == 6
    assert P.to_kmajor8(kw) is kw


@pytest.mark.parametrize("bits,group,sym,match", [(4, -1, True, "8-bit symmetric"),
                                                  (8, 128, True, "per-channel"),
                                                  (8, -1, False, "8-bit symmetric")])
def test_kmajor_layout_refuses_other_formats(bits, group, sym, match):
    pw = _packed(_gen("kmref"), 8, 256, bits, group, sym)
    with pytest.raises(ValueError, match=match):
        P.to_kmajor8(pw)


@pytest.mark.parametrize("dtype", [bf16, f16, f32])
@pytest.mark.parametrize("M,N,K", [(1, 40, 100), (5, 33, 96), (19, 70, 160), (40, 17, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_dispatched_against_float64(dtype, M, N, K, bias):
    gen = _gen(f"i8{dtype}{M}{N}{K}{bias}")
    kw = _kmajor(gen, N, K)
    x = (torch.randn(M, K, generator=gen) * 2).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    _check(x, kw, b, act="int8")


@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_both_forms_and_k_splits(swap, split):
    # K = 232: 8 blocks of 32, the last partial (232 = 7 * 32 + 8); split 3 -> 3 + 3 + 2
    # blocks; two row blocks and three column blocks (wrapped rows in the last of each). Twice:
    # the tickets are back at 0 after a call.
    gen = _gen(f"i8forms{swap}{split}")
    kw = _kmajor(gen, 70, 232)
    x = torch.randn(21, 232, generator=gen).to(bf16)
    b = torch.randn(70, generator=gen).to(bf16)
    for _ in range(2):
        _check(x, kw, b, act="int8", path=_path(swap, split=split))


def _tma_path(programs=None):
    return dict(_path(False), TMA=True, PROGRAMS=programs)


@pytest.mark.parametrize("dtype", [bf16, f16])
@pytest.mark.parametrize("M,N,K", [(21, 70, 232), (5, 33, 96), (40, 17, 64), (70, 100, 160)])
@pytest.mark.parametrize("programs", [None, 2])
def test_tma_tile_against_float64_and_the_pointer_tile(dtype, M, N, K, programs):
    # Rows past M and N and channels past K come from the descriptors' zero fill (232 = 7 * 32
    # + 8); 2-3 programs walk several tiles each. The same blocks and the same order of the
    # scale products as the plain pointer tile: the same result bit for bit.
    gen = _gen(f"i8tma{dtype}{M}{N}{K}")
    kw = _kmajor(gen, N, K)
    x = (torch.randn(M, K, generator=gen) * 2).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    got = _check(x, kw, b, act="int8", path=_tma_path(programs))
    plain = Q._launch(x, kw.qweight, kw.scales, None, b, None, 8, -1, K, "int8", True,
                      path=_path(False))
    assert torch.equal(got, plain)


def test_tma_tile_falls_back_where_tma_cannot_copy():
    # K = 100: the codes' rows are 100 bytes apart, off TMA's 16-byte rule; the launch runs the
    # pointer tile instead and computes the same function.
    gen = _gen("i8tmafallback")
    kw = _kmajor(gen, 24, 100)
    x = torch.randn(7, 100, generator=gen).to(bf16)
    codes, _ = Q.quantize_activations_triton(x, "int8", None, True)
    assert not I8.tma_ok(codes, kw.qweight)
    assert I8.tma_ok(torch.zeros(7, 96, dtype=torch.int8), kw.qweight)  # rows 96 bytes apart
    _check(x, kw, None, act="int8", path=_tma_path())


def test_smoothing_vector_and_large_values():
    # A SmoothQuant vector and rows of very different magnitudes (per-token scales).
    gen = _gen("i8smooth")
    kw = _kmajor(gen, 24, 96)
    x = torch.randn(6, 96, generator=gen) * torch.tensor([1e-3, 1, 10, 300, 1, 5])[:, None]
    smooth = torch.rand(96, generator=gen) + 0.5
    _check(x, kw, None, smooth=smooth, act="int8")


def test_codes_entry_is_the_op():
    gen = _gen("i8codes")
    kw = _kmajor(gen, 48, 160)
    x = torch.randn(9, 160, generator=gen).to(bf16)
    b = torch.randn(48, generator=gen).to(bf16)
    codes, xs = Q.quantize_activations_triton(x, "int8", None, True)
    got = torch.ops.q3n.qlinear_codes(codes, xs, kw.qweight, kw.scales, None, b, 8, -1, 160,
                                      "int8", bf16)
    want = torch.ops.q3n.qlinear(x, kw.qweight, kw.scales, None, b, None, 8, -1, 160, "int8")
    assert torch.equal(got, want)
    assert torch.ops.q3n.qlinear_codes(codes[:0], xs[:0], kw.qweight, kw.scales, None, b, 8, -1,
                                       160, "int8", bf16).shape == (0, 48)


def test_fake_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    kw = _kmajor(_gen("i8fake"), 48, 100)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(7, 100, dtype=bf16)
        y = torch.ops.q3n.qlinear(x, kw.qweight, kw.scales, None, None, None, 8, -1, 100, "int8")
    assert tuple(y.shape) == (7, 48) and y.dtype == bf16


@pytest.mark.parametrize("change,match", [
    (dict(act="fp8"), "int8 activations"),
    (dict(ag=32), "one activation scale per token"),
    (dict(bits=4), "8-bit symmetric"),
    (dict(K=96), r"must be \[N, 96\] for K=96"),
    (dict(scales="wide"), r"scales must be float16/float32 \[1, 48\]"),
    (dict(bias="short"), r"bias must be \[48\]"),
])
def test_supports_names_the_problem(change, match):
    kw = _kmajor(_gen("i8sup"), 48, 128)
    K = change.get("K", 128)
    x = torch.randn(3, K).to(bf16)
    scales = kw.scales.repeat(2, 1) if change.get("scales") else kw.scales
    bias = torch.zeros(40, dtype=bf16) if change.get("bias") else None
    reason = Q.supports(x, kw.qweight, scales, None, bias, None, change.get("bits", 8), -1, K,
                        change.get("act", "int8"), change.get("ag", -1))
    assert reason is not None and re.search(match, reason), reason
    with pytest.raises(ValueError, match=match):
        Q._launch(x, kw.qweight, scales, None, bias, None, change.get("bits", 8), -1, K,
                  change.get("act", "int8"), True, act_group_size=change.get("ag", -1))


def test_supports_refuses_k_past_int32_exactness():
    # FakeTensors: no 2^17-channel weight is built.
    from torch._subclasses.fake_tensor import FakeTensorMode

    K = I8.MAX_K + 32
    with FakeTensorMode():
        x = torch.empty(2, K, dtype=bf16)
        w8 = torch.empty(16, K, dtype=torch.int8)
        scales = torch.empty(1, 16, dtype=torch.float16)
        reason = Q.supports(x, w8, scales, None, None, None, 8, -1, K, "int8")
    assert reason is not None and "int32 sums could overflow" in reason, reason


def test_forced_path_must_be_i8():
    kw = _kmajor(_gen("i8forced"), 16, 64)
    x = torch.randn(2, 64).to(bf16)
    with pytest.raises(ValueError, match="runs on the i8 path, not 'mm'"):
        Q._launch(x, kw.qweight, kw.scales, None, None, None, 8, -1, 64, "int8", True,
                  path=dict(path="mm"))


@pytest.mark.parametrize("M,N,K,want", [
    (1, 4096, 4096, dict(SWAP=True, BLOCK_M=16, BLOCK_N=64, SPLIT_K=4)),
    (16, 12288, 4096, dict(SWAP=True, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1)),
    (64, 4096, 4096, dict(SWAP=True, BLOCK_M=64, BLOCK_N=64, SPLIT_K=2)),
    (64, 28672, 8192, dict(SWAP=True, BLOCK_M=64, BLOCK_N=128, SPLIT_K=1)),
    # The 64 x 64 swapped tile where its tiles fit two an SM and K <= 8192 (s30run2), split to
    # fill them by blocks of 8 x 128 channels.
    (96, 4096, 4096, dict(SWAP=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2,
                          num_stages=5)),
    (96, 4096, 12288, dict(SWAP=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4)),
    (128, 1024, 4096, dict(SWAP=True, BLOCK_M=64, BLOCK_N=64, SPLIT_K=4)),
    (512, 2048, 4096, dict(SWAP=True, BLOCK_M=64, BLOCK_N=64, SPLIT_K=1)),
    (320, 4096, 4096, dict(SWAP=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1)),
    (384, 4096, 4096, dict(SWAP=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1)),
    (96, 12288, 4096, dict(SWAP=True, BLOCK_M=128, BLOCK_N=64, SPLIT_K=1)),
    (192, 12288, 4096, dict(SWAP=True, BLOCK_M=128, BLOCK_N=128, num_warps=8, SPLIT_K=1)),
    # Waves of whole tiles (s29run1): 288 tiles of 128 x 128 are three waves, 480 of 64 x 128
    # four half-size ones; 672 wide tiles of 28672 x 8192 are six, where 1120 plain are nine.
    (288, 12288, 4096, dict(SWAP=False, BLOCK_M=64, BLOCK_N=128, SPLIT_K=1)),
    (320, 12288, 4096, dict(SWAP=False, BLOCK_M=64, BLOCK_N=128, SPLIT_K=1)),
    (448, 12288, 4096, dict(SWAP=True, BLOCK_M=128, BLOCK_N=128, num_warps=8, SPLIT_K=1)),
    (288, 28672, 8192, dict(SWAP=True, BLOCK_M=128, BLOCK_N=128, num_warps=8, SPLIT_K=1)),
    (256, 4096, 4096, dict(SWAP=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1,
                           PREFETCH=2)),
    (256, 4096, 12288, dict(SWAP=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2)),
    (512, 4096, 12288, dict(SWAP=True, BLOCK_M=128, BLOCK_N=64, SPLIT_K=1)),
    (1024, 4096, 4096, dict(SWAP=False, BLOCK_M=128, BLOCK_K=64, SPLIT_K=1)),
    # The TMA tile where its 128 x 256 tiles make 3.5 waves (s29run3).
    (4096, 28672, 8192, dict(SWAP=False, BLOCK_M=128, BLOCK_N=256, TMA=True, PROGRAMS=132)),
    (4096, 4096, 4096, dict(SWAP=False, BLOCK_M=128, BLOCK_N=256, TMA=True)),
    (1024, 28672, 8192, dict(SWAP=False, BLOCK_M=128, BLOCK_N=256, TMA=True)),
    (1024, 12288, 4096, dict(SWAP=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)),
    (2048, 256, 4096, dict(SWAP=False, BLOCK_M=64, BLOCK_N=128, SPLIT_K=1)),
])
def test_launch_rule_on_the_h200(M, N, K, want):
    # The measured choices (s26run1, s26run3, s29run1, s30run2; 132 SMs), and never more programs than the
    # rule's cap.
    cfg = I8.choose(M, N, K, 132)
    assert {k: cfg[k] for k in want} == want, cfg
    tiles = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
    assert cfg["SPLIT_K"] == 1 or tiles * cfg["SPLIT_K"] <= 2 * 132
    assert -(-K // cfg["BLOCK_K"]) >= cfg["SPLIT_K"]


def test_weight_prefetch_to_512_rows():
    # Two K blocks of the weight asked of L2 before the PDL wait from 1 to 512 rows (s26run4,
    # s30run4); the TMA and plain tiles above do not.
    for M in (1, 16, 64, 65, 300, 512):
        assert I8.choose(M, 4096, 4096, 132)["PREFETCH"] == I8.PREFETCH_BLOCKS == 2, M
    for M in (513, 4096):
        assert not I8.choose(M, 4096, 4096, 132).get("PREFETCH"), M


def test_quantize_pass_packs_w8a8_k_major():
    """W8A8 per channel and token compiles to the K-major weight (the report says so, the
    graph holds int8 [N, K_pad], same bytes as the planes); per-32-channel activation scales
    keep the bit planes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 24)).eval()
    x = torch.randn(4, 80)
    fmt = {"weight_bits": 8, "activation_bits": 8, "activation_format": "int8",
           "group_size": -1}
    for ag, layout in ((-1, "k-major int8"), (32, "bit planes")):
        torch._dynamo.reset()
        cfg = {"rules": [{"match": "*", **fmt, "activation_group_size": ag}],
               "calibration": {"method": "rtn"}}
        compiled = torch.compile(model, backend="q3n",
                                 options={"quant_config": cfg, "strict": True})
        with torch.no_grad():
            out, want = compiled(x), model(x)
        assert (out - want).abs().max() <= 0.05 * want.abs().max()
        q = q3n_compile.reports()[-1]["passes"]["quantize"]
        assert q["rewritten"] == 2
        assert [e["weight_layout"] for e in q["detail"]["layers"]] == [layout, layout]
        # 80 and 48 channels pad to 96 and 64; per-channel fp16 scales.
        assert q["detail"]["weight_bytes_after"] == 48 * 96 + 24 * 64 + 2 * (48 + 24)


# ------------------------------------------------------------------------------------------
# GPU lane
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16, 33, 64, 100, 256, 1000])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1000, 4000), (4096, 12288)])
def test_gpu_dispatched_against_float64(M, N, K):
    gen = _gen(f"i8gpu{M}{N}{K}")
    kw = _kmajor(gen, N, K, "cuda")
    x = (torch.randn(M, K, generator=gen) * 2).to(bf16).cuda()
    b = torch.randn(N, generator=gen).to(bf16).cuda()
    for _ in range(2):  # split-K tickets back at 0
        _check(x, kw, b, act="int8")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,swap,bm,bn", [(300, 12288, 4096, False, 64, 128),
                                               (300, 12000, 4000, False, 64, 128),
                                               (448, 12288, 4096, True, 128, 128),
                                               (360, 6000, 4096, True, 128, 64),
                                               (200, 2000, 4000, True, 64, 64),
                                               (256, 4096, 4096, True, 64, 64)])
def test_gpu_mid_rows_by_waves_against_float64(M, N, K, swap, bm, bn):
    # The 65-512-row rule's tiles on the GPU's own SM count: by waves of whole tiles (s29run1)
    # the plain 64 x 128 tile, the wide swapped one and the swapped one on 128 rows; where they
    # fit two an SM the 64 x 64 swapped one (s30run2; 200 x 2000 x 4000: split 2, partial
    # blocks of rows, columns and channels).
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = I8.choose(M, N, K, sms)
    if sms == 132:
        assert (cfg["SWAP"], cfg["BLOCK_M"], cfg["BLOCK_N"]) == (swap, bm, bn), cfg
    gen = _gen(f"i8gpumid{M}{N}{K}")
    kw = _kmajor(gen, N, K, "cuda")
    x = (torch.randn(M, K, generator=gen) * 2).to(bf16).cuda()
    _check(x, kw, torch.randn(N, generator=gen).to(bf16).cuda(), act="int8")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(2000, 12288, 4096), (2050, 12000, 4000), (4096, 4096, 4096)])
def test_gpu_tma_tile_against_float64_and_the_pointer_tile(M, N, K):
    # Dispatched to the TMA tile on the H200 (its tiles make 3.5 waves or more); 12000 columns
    # and 4000 channels leave partial tiles to the descriptors' zero fill. The pointer kernel
    # on the same tile gives the same bits.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = _gen(f"i8gputma{M}{N}{K}")
    kw = _kmajor(gen, N, K, "cuda")
    x = (torch.randn(M, K, generator=gen) * 2).to(bf16).cuda()
    b = torch.randn(N, generator=gen).to(bf16).cuda()
    cfg = dict(I8.choose(M, N, K, sms), path="i8")
    if sms == 132:
        assert cfg.get("TMA"), cfg
    cfg["TMA"] = True
    got = _check(x, kw, b, act="int8", path=cfg)
    plain = Q._launch(x, kw.qweight, kw.scales, None, b, None, 8, -1, K, "int8", False,
                      path=dict(cfg, TMA=False))
    assert torch.equal(got, plain)


@pytest.mark.gpu
def test_gpu_tma_tile_falls_back_off_16_bytes():
    # K = 4008: the codes' rows are 4008 bytes apart (not a multiple of 16), so the forced TMA
    # launch runs the pointer kernel on the same tile.
    gen = _gen("i8gputmafb")
    kw = _kmajor(gen, 2048, 4008, "cuda")
    x = torch.randn(600, 4008, generator=gen).to(bf16).cuda()
    _check(x, kw, None, act="int8", path=dict(I8.TILE_MM_TMA, path="i8", SWAP=False,
                                              SPLIT_K=1, TMA=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f16, f32])
def test_gpu_other_dtypes(dtype):
    gen = _gen(f"i8gpudt{dtype}")
    kw = _kmajor(gen, 2048, 1024, "cuda")
    for M in (3, 300):
        _check(torch.randn(M, 1024, generator=gen).to(dtype).cuda(), kw, None, act="int8")
