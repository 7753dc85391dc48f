"""q3n::qlinear's mm8 path (activation codes times the packed weight's codes on 8-bit tensor cores,
unpacked in the kernel) against float64: the CPU lane in Triton's interpreter (fp16 operands
stand in for e4m3 there), the GPU lane (-m gpu) on fp8 and int8 MMAs at model widths."""

import pytest
import torch

from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_mm8 as M8

from .test_qlinear import _check, _gen, _packed, bf16

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# bits, group, symmetric, activation format, activation group
FORMATS = [(4, 128, False, "fp8", -1), (4, 128, True, "int8", 128), (4, -1, False, "int8", -1),
           (4, -1, True, "fp8", 128), (8, -1, True, "int8", -1), (8, 128, True, "int8", 128)]
IDS = [f"w{b}g{g}{'s' if s else 'a'}_{a}_ag{ag}" for b, g, s, a, ag in FORMATS]


def _path(bm, bn, warps=4, stages=1, group_m=2, prefetch=True, split=1):
    return dict(path="mm8", BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                GROUP_M=group_m, PREFETCH=prefetch, SPLIT_K=split)


@pytest.mark.parametrize("bits,group,sym,act,ag", FORMATS, ids=IDS)
@pytest.mark.parametrize("M,N", [(1, 48), (37, 80)])
@pytest.mark.parametrize("bias", [False, True])
def test_against_float64(bits, group, sym, act, ag, M, N, bias):
    # K off the 128-channel block where the groups allow it (per channel, per-token codes).
    K = 200 if group == -1 and ag == -1 else 256
    gen = _gen(f"mm8{bits}{group}{sym}{act}{ag}{M}{N}{bias}")
    pw = _packed(gen, N, K, bits, group, sym)
    x = (torch.randn(M, K, generator=gen) * 2).to(bf16)
    b = torch.randn(N, generator=gen).to(bf16) if bias else None
    _check(x, pw, b, act=act, path=_path(16, 32), ag=ag)


@pytest.mark.parametrize("group_m,prefetch", [(1, True), (3, False)])
def test_program_order_and_prefetch_keep_the_result(group_m, prefetch):
    # 3 x 3 tiles: GROUP_M 1 and 3 (a group of rows past M's blocks), words loaded in or a
    # block ahead; 384 channels: three K blocks.
    gen = _gen(f"mm8order{group_m}{prefetch}")
    pw = _packed(gen, 70, 384, 4, 128, False)
    x = torch.randn(40, 384, generator=gen).to(bf16)
    _check(x, pw, None, act="fp8", path=_path(16, 32, group_m=group_m, prefetch=prefetch))


@pytest.mark.parametrize("split,bias", [(2, True), (3, False), (8, True)])
def test_split_k_is_the_unsplit_sum(split, bias):
    # 640 channels: 5 K blocks, split 2 (3 + 2 blocks), 3 (2 + 2 + 1), 8 (capped at 5);
    # per-128-channel codes scales and a bias (added by the first split only). Run twice: the
    # tickets are back at 0 after a call.
    gen = _gen(f"mm8split{split}{bias}")
    pw = _packed(gen, 70, 640, 4, 128, False)
    x = torch.randn(21, 640, generator=gen).to(bf16)
    b = torch.randn(70, generator=gen).to(bf16) if bias else None
    for _ in range(2):
        _check(x, pw, b, act="int8", path=_path(16, 32, split=split), ag=128)


def test_split_k_needs_tickets():
    gen = _gen("mm8tickets")
    pw = _packed(gen, 40, 256, 4, 128, False)
    codes, xs = Q.quantize_activations(torch.randn(3, 256, generator=gen), "int8")
    with pytest.raises(ValueError, match="split-K needs the ticket counters"):
        M8.run(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 128, "int8", -1, bf16,
               _path(16, 32, split=2), True)


def test_eligible_reasons():
    ok = dict(bits=4, group_size=128, symmetric=False, act="fp8", act_group_size=-1,
              codes_dtype=torch.float8_e4m3fn)
    assert M8.eligible(**ok) is None
    assert M8.eligible(**dict(ok, act="int8", codes_dtype=torch.int8, bits=8,
                              symmetric=True)) is None
    cases = [(dict(bits=6), "4- and 8-bit"), (dict(group_size=64), "groups of 128"),
             (dict(act_group_size=32), "per 128 channels"),
             (dict(bits=8, symmetric=True), "not exact in e4m3"),
             (dict(act="int8", codes_dtype=torch.int8, bits=8), "do not fit int8"),
             (dict(act="int12", codes_dtype=torch.float16), "int8 or fp8")]
    for change, reason in cases:
        got = M8.eligible(**dict(ok, **change))
        assert got is not None and reason in got, (change, got)


def test_forced_path_that_does_not_apply_says_why():
    gen = _gen("mm8forced")
    pw = _packed(gen, 48, 128, 6, 128, False)
    x = torch.randn(20, 128, generator=gen).to(bf16)
    with pytest.raises(ValueError, match="mm8 path does not take this call.*4- and 8-bit"):
        Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, 6, 128, 128, "int8",
                  interpreter=True, path=_path(16, 32))


# ---------------------------------------------------------------------------------------------
# GPU lane: fp8 and int8 MMAs, the benchmark's tiles, odd M and N

GPU_TILES = [_path(128, 128, 8, 3, 8), _path(128, 64, 4, 3, 8),
             _path(128, 128, 8, 3, 8, prefetch=False), _path(128, 32, 4, 3, 8, split=4)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [129, 256, 1000])
@pytest.mark.parametrize("tile", range(len(GPU_TILES)))
@pytest.mark.parametrize("bits,group,sym,act,ag", FORMATS, ids=IDS)
def test_gpu_against_float64(bits, group, sym, act, ag, M, tile):
    if act == "fp8" and not Q.fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores on this GPU")
    N, K = 4096 + 48, 4096
    gen = _gen(f"gpumm8{bits}{group}{act}{ag}{M}{tile}")
    pw = _packed(gen, N, K, bits, group, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    bias = torch.randn(N, generator=gen).to(bf16).cuda() if M != 1000 else None
    _check(x, pw, bias, act=act, path=GPU_TILES[tile], ag=ag)
