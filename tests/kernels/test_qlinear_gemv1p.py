"""The single-plane GEMV (q3n::qlinear's ``gemv1p`` path: 8-, 4- and 2-bit weights, and 6-bit
ones as a 4-bit and a 2-bit plane; M <= 16)
against the float64 dequantised reference (CPU lane: Triton interpreter; GPU: -m gpu)."""

import pytest
import torch

from q3n_compile.kernels import packing as P
from q3n_compile.kernels import qlinear as Q

from .subprocess_lane import json_without_interpreter
from .test_qlinear import (_check, _exact, _gen, _packed, _replay_with_new_x,
                          _w4a16_chain, bf16, f16, f32)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def _path(M, group, block_m=None, block_n=32, block_k=64, split=1, reduce="ticket",
          prefetch=1, ag=Q.PER_TOKEN):
    """A forced gemv1p launch; BLOCK_K capped at the groups as the dispatch caps it."""
    return dict(path="gemv1p", BLOCK_M=block_m or min(16, 1 << (M - 1).bit_length()),
                BLOCK_N=block_n, BLOCK_K=Q._k_block(group, block_k, ag), SPLIT_K=split,
                REDUCE=reduce, PREFETCH=prefetch, num_warps=4, num_stages=1)


# (bits, group, symmetric, K): K odd (not a multiple of 32: the packing pads it) only
# per-channel, since a group must divide K; grouped K of 3 groups, so a K block never spans two.
WEIGHTS = [
    (4, 128, False, 384), (4, 64, True, 192), (4, 32, False, 96), (4, -1, True, 83),
    (4, -1, False, 147), (8, 128, True, 384), (8, -1, True, 83), (8, 32, True, 96),
    (2, 64, False, 192), (2, -1, True, 83),
    (6, 128, False, 384), (6, 32, True, 96), (6, -1, False, 83), (6, 64, True, 192),
]
# (M, x dtype, split, reduce, BLOCK_M, prefetch) cycled over the weights: M in {1, 3, 16}, row
# blocks smaller than M (rows masked), one launch split-K and atomics, prefetch depths 0-2.
LAUNCHES = [
    (1, bf16, 1, "ticket", None, 1), (3, f32, 3, "ticket", None, 0),
    (16, f16, 2, "atomic", 4, 2), (3, bf16, 2, "ticket", 2, 1),
    (16, f32, 1, "ticket", None, 2), (1, f16, 4, "atomic", None, 0),
]


def _cases():
    for i, (bits, group, sym, K) in enumerate(WEIGHTS):
        for j in range(2):
            M, dtype, split, reduce, bm, pf = LAUNCHES[(2 * i + j) % len(LAUNCHES)]
            name = (f"w{bits}_g{group}_{'sym' if sym else 'asym'}_k{K}_m{M}_{str(dtype)[6:]}"
                    f"_split{split}{reduce[0]}_bm{bm or 'M'}_pf{pf}")
            yield pytest.param(bits, group, sym, K, M, dtype, split, reduce, bm, pf, id=name)


@pytest.mark.parametrize("bits,group,sym,K,M,dtype,split,reduce,bm,pf", list(_cases()))
def test_gemv1p_16bit_activations(bits, group, sym, K, M, dtype, split, reduce, bm, pf):
    if bits == 8 and not sym:
        pytest.skip("8-bit zero points are refused with 16-bit activations")
    gen = _gen(f"g1p{bits}{group}{sym}{K}{M}{dtype}{split}")
    N = 45  # odd: the last column block is partial
    pw = _packed(gen, N, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if M != 16 else None
    _check(x, pw, bias, path=_path(M, group, bm, split=split, reduce=reduce, prefetch=pf))


@pytest.mark.parametrize("bits,group,sym,act,ag,M", [
    (4, 128, False, "int8", Q.PER_TOKEN, 1), (8, -1, True, "int8", Q.PER_TOKEN, 3),
    (4, 32, True, "fp8", Q.PER_TOKEN, 16), (8, 64, False, "int12", Q.PER_TOKEN, 1),
    (4, 128, False, "int8", 32, 3), (8, -1, True, "int8", 64, 1), (2, 64, True, "fp8", 128, 1),
    (6, 128, False, "int12", Q.PER_TOKEN, 1), (6, 64, True, "int8", 64, 3),
])
def test_gemv1p_quantized_activations(bits, group, sym, act, ag, M):
    gen = _gen(f"g1pq{bits}{group}{act}{ag}{M}")
    K = 3 * group if group != -1 else 83
    pw = _packed(gen, 37, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen)
    x[:, 5] *= 20  # an outlier channel
    _check(x.to(bf16), pw, torch.randn(37, generator=gen).to(bf16), act=act,
           path=_path(M, group, split=2, ag=ag), ag=ag)


def test_gemv1p_block_k_128_and_wide_columns():
    # The GPU default's shape of block (128 channels, 8/16/32 words per block) on one K block
    # and on several, with every column block partial but the first.
    gen = _gen("g1pwide")
    for bits in (4, 8, 2, 6):
        pw = _packed(gen, 150, 256, bits, 128, bits == 8)
        x = torch.randn(1, 256, generator=gen).to(bf16)
        _check(x, pw, path=_path(1, 128, block_n=128, block_k=128, split=2))


@pytest.mark.parametrize("M,block_m,split,prefetch", [(1, 1, 1, 1), (1, 1, 4, 2), (4, 2, 2, 0),
                                                      (16, 16, 3, 2), (1, 1, 16, 2)])
def test_gemv1p_even_sizes(M, block_m, split, prefetch):
    # N, K and M multiples of the blocks: the loop runs without masks, and the prefetch of the
    # last iteration of each split reloads its own block (the last split's ends at the weight's
    # last row). split 3 of 8 K blocks: uneven splits; 16: half the splits have no K block.
    gen = _gen(f"g1peven{M}{split}")
    for bits, group, sym in ((4, 64, False), (8, -1, True), (2, 32, True), (6, 32, False)):
        pw = _packed(gen, 128, 512, bits, group, sym)
        x = torch.randn(M, 512, generator=gen).to(bf16)
        _check(x, pw, torch.randn(128, generator=gen).to(bf16),
               path=_path(M, group, block_m, block_n=32, block_k=64, split=split,
                          prefetch=prefetch))


def test_gemv1p_tickets_are_reset():
    # The one-launch split-K leaves every ticket at 0, so the next call (any shape) starts
    # clean; a second identical call gives the same bits (partials summed in split order).
    gen = _gen("g1ptickets")
    pw = _packed(gen, 70, 256, 4, 64, False)
    x = torch.randn(2, 256, generator=gen).to(bf16)
    path = _path(2, 64, block_n=32, split=4)
    args = (x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 64, 256, "none")
    first = Q._launch(*args, interpreter=True, path=path)
    second = Q._launch(*args, interpreter=True, path=path)
    assert torch.equal(first, second)
    assert all(int(buf.abs().sum()) == 0 for kept in Q._TICKETS.values() for buf in kept)


def test_ticket_buffer_grows_and_keeps_the_old_one():
    # A larger grid gets a larger buffer; the old one stays alive (a CUDA graph captured with
    # it still points at it), and the newest serves every smaller request after.
    dev = torch.device("cpu")
    small = Q._tickets(dev, 8)
    big = Q._tickets(dev, small.numel() + 1)
    assert big.numel() > small.numel() and big.dtype == torch.int32
    assert Q._tickets(dev, 8) is big
    assert any(buf is small for buf in Q._TICKETS[(dev.type, dev.index)])


def test_gemv1p_forced_path_with_defaults():
    gen = _gen("g1pminimal")
    pw = _packed(gen, 40, 128, 4, 32, False)
    x = torch.randn(3, 128, generator=gen).to(bf16)
    _check(x, pw, path=dict(path="gemv1p", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4))


def test_gemv1p_refuses_what_it_cannot_do():
    gen = _gen("g1prefuse")
    pw5 = _packed(gen, 16, 64, 5, 32, False)
    x = torch.randn(1, 64, generator=gen)
    with pytest.raises(ValueError, match="one bit plane"):
        Q._launch(x, pw5.qweight, pw5.scales, pw5.zeros, None, None, 5, 32, 64, "none",
                  interpreter=True, path=_path(1, 32))
    pw4 = _packed(gen, 16, 64, 4, 32, False)
    with pytest.raises(ValueError, match="does not divide the group"):
        Q._launch(x, pw4.qweight, pw4.scales, pw4.zeros, None, None, 4, 32, 64, "none",
                  interpreter=True, path=dict(_path(1, -1), BLOCK_K=64))


def test_gemv1p_dispatch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for bits in Q.GEMV1P_BITS:
        assert Q.choose_path(1, 4096, 4096, bits, 128, "none", bf16, cpu,
                             interpreter=True)["path"] == "gemv1p"
        cfg = Q.choose_path(1, 12288, 4096, bits, 32, "none", bf16, cuda, sm_count=132)
        assert cfg["path"] == "gemv1p" and cfg["BLOCK_K"] == 32 and cfg["BLOCK_M"] == 1
        small = Q.choose_path(1, 4096, 4096, bits, 32, "none", bf16, cuda, sm_count=132)
        assert small["path"] == "gemv1p"  # 8-bit weights too, since s8run1's tuned launch
    for bits in (3, 5, 7):  # other multi-plane widths: the word-per-plane GEMV as before
        assert Q.choose_path(1, 4096, 4096, bits, 128, "none", bf16, cuda,
                             sm_count=132)["path"] == "gemv"
    # At least 4 splits, doubled until the grid covers the SMs 3 times, each >= 2 K blocks;
    # one row: 64 columns and 4 warps (s8run1's sweep).
    one = Q.gemv1p_config(1, 4096, 4096, 128, sms=132)
    assert (one["SPLIT_K"], one["BLOCK_N"], one["num_warps"]) == (8, 64, 4)
    assert Q.gemv1p_config(1, 12288, 4096, 128, sms=132)["SPLIT_K"] == 4
    assert Q.gemv1p_config(1, 28672, 8192, 128, sms=132)["SPLIT_K"] == 4
    assert Q.gemv1p_config(1, 4096, 256, 128, sms=132)["SPLIT_K"] == 1  # 2 K blocks
    assert Q.gemv1p_config(1, 64, 128, 128, sms=132)["SPLIT_K"] == 1
    # Two rows: warps double while x's 2 x 128 block has as many elements as the threads.
    assert Q.gemv1p_config(2, 4096, 4096, 128, sms=132)["num_warps"] == 16
    act_grouped = Q.gemv1p_config(2, 4096, 4096, -1, sms=132, act_group_size=64)
    assert act_grouped["BLOCK_K"] == 64 and act_grouped["BLOCK_M"] == 2
    for base in Q.GEMV1P_SWEEP:  # every sweep entry resolves to a launchable config
        cfg = Q.gemv1p_config(16, 12288, 4096, 128, sms=132, base=base)
        assert isinstance(cfg["SPLIT_K"], int) and cfg["BLOCK_K"] <= 128


# ---------------------------------------------------------------------------------------------
# GPU lane

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


GPU_FORMATS = [(4, 128, False, "none"), (8, -1, True, "none"), (4, 128, True, "int8"),
               (2, 64, False, "none"), (6, 128, False, "none"), (6, 128, False, "int12")]


def _gpu_case(name, bits, group, sym, M):
    gen = _gen(name)
    N, K = 4096 + 96, 4096  # N not a multiple of the column blocks: masked loads
    pw = _packed(gen, N, K, bits, group, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    bias = torch.randn(N, generator=gen).to(bf16).cuda()
    return N, K, pw, x, bias


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits,group,sym,act", GPU_FORMATS)
def test_gpu_gemv1p_every_sweep_config(bits, group, sym, act):
    # One row, every GEMV1P_SWEEP launch; a second call gives the same bits (tickets reset,
    # partials summed in split order), except where the split is by atomics.
    N, K, pw, x, bias = _gpu_case(f"gpug1p{bits}{act}", bits, group, sym, 1)
    for base in Q.GEMV1P_SWEEP:
        cfg = Q.gemv1p_config(1, N, K, group, sms=132, base=base)
        first = _check(x, pw, bias, act=act, path=cfg)
        if cfg["REDUCE"] == "ticket":
            again = Q._launch(x, pw.qweight, pw.scales, pw.zeros, bias, None, bits, group, K,
                              act, interpreter=False, path=cfg)
            assert torch.equal(first, again)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [2, 3, 16])
@pytest.mark.parametrize("bits,group,sym,act", GPU_FORMATS)
@pytest.mark.parametrize("reduce", ["ticket", "atomic"])
def test_gpu_gemv1p_rows(bits, group, sym, act, M, reduce):
    N, K, pw, x, bias = _gpu_case(f"gpug1prows{bits}{act}{M}", bits, group, sym, M)
    cfg = dict(Q.gemv1p_config(M, N, K, group, sms=132), REDUCE=reduce)
    _check(x, pw, bias, act=act, path=cfg)
    _check(x, pw, bias, act=act, path=dict(cfg, BLOCK_M=4 if M > 2 else 1))


@pytest.mark.gpu
@needs_cuda
def test_gpu_gemv1p_in_a_cuda_graph():
    gen = _gen("gpug1pgraph")
    N, K = 12288, 4096
    pw = _packed(gen, N, K, 4, 128, False, device="cuda")
    x = torch.randn(1, K, generator=gen).to(bf16).cuda()
    args = (x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 128, K, "none")
    eager = torch.ops.q3n.qlinear(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.q3n.qlinear(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.q3n.qlinear(*args)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.parametrize("bits,sym,dtype,denorm", [
    (4, False, f16, 1), (4, True, f32, 1), (8, True, f16, 1), (8, True, f32, 1),
    (2, False, f16, 1), (2, True, f32, 1), (4, False, f32, 0), (2, False, f16, 0),
])
def test_gemv1p_every_code_in_every_position_exactly(bits, sym, dtype, denorm):
    # Row m of x is one-hot at channel k = m (+ 16): y[m, n] = s[n] * (q[n, k] - z[n]) * v, exact
    # in fp32 on both unpacks (the denormal one scales by 2^-64 and back: powers of two), so it
    # must equal the float64 value rounded to x's dtype bit for bit. Columns hold every code
    # value at every channel, so every (position in the word, value) pair is read, including
    # the positions the denormal unpack takes from the word's upper half. (fp16 and fp32
    # outputs: the interpreter's fp32 -> bf16 store truncates, where CUDA rounds to nearest.)
    N, K = 1 << bits, 32
    gen = _gen(f"g1pexact{bits}{sym}{dtype}{denorm}")
    codes = (torch.arange(N)[:, None] + torch.arange(K)[None, :] * 3) % N
    scales = (torch.rand(1, N, generator=gen) * 0.02 + 0.002).to(torch.float16)
    zeros = None if sym else torch.randint(0, N, (1, N), generator=gen).to(torch.uint8)
    pw = P.pack(codes, scales, zeros, bits, -1)
    value = 2.0 ** 12 if dtype == f32 else 1.0
    for first in (0, 16):
        x = torch.zeros(16, K, dtype=dtype)
        x[torch.arange(16), first + torch.arange(16)] = value
        out = Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, bits, -1, K, "none",
                        interpreter=True, path=dict(_path(16, -1, block_k=32), DENORM=denorm))
        want = _exact(x, pw, None, None, "none").to(dtype)
        assert torch.equal(out, want), (out - want).abs().max()


def test_gemv1p_denormal_unpack_range():
    # Inside the documented range of x (|x| in [2^-62, 2^43)) the denormal unpack matches the
    # float64 reference to fp32 accumulation; both ends in one launch (bf16 x, fp32 partials).
    gen = _gen("g1prange")
    pw = _packed(gen, 40, 256, 4, 128, False)
    x = torch.randn(2, 256, generator=gen)
    x[0] *= 2.0 ** 40
    x[1] *= 2.0 ** -58
    for row in range(2):
        _check(x[row: row + 1].to(bf16), pw, path=dict(_path(1, 128), DENORM=1))


def test_gemv1p_unpack_choice():
    # 4-bit weights with 16-bit x or activation codes read codes as denormals; 6-bit weights
    # (two planes), 8- and 2-bit ones (slower on the H200, s16run1-2) and float32 x (the whole
    # fp32 range) keep the magic-float unpack.
    for dtype in (bf16, f16, torch.int8, torch.float8_e4m3fn, torch.int16):
        assert Q.gemv1p_denorm(4, dtype)
    assert not Q.gemv1p_denorm(4, f32)
    assert not any(Q.gemv1p_denorm(bits, bf16) for bits in (2, 6, 8))
    # With the denormal unpack the K split also doubles while a split has more than 8 K blocks.
    assert Q.gemv1p_config(1, 4096, 12288, 128, sms=132, bits=4)["SPLIT_K"] == 16
    assert Q.gemv1p_config(1, 4096, 12288, 128, sms=132, bits=8)["SPLIT_K"] == 8
    assert Q.gemv1p_config(1, 28672, 8192, 128, sms=132, bits=4)["SPLIT_K"] == 8
    assert Q.gemv1p_config(1, 28672, 8192, 128, sms=132, bits=4, x_dtype=f32)["SPLIT_K"] == 4
    assert Q.gemv1p_config(1, 12288, 4096, 128, sms=132, bits=4)["SPLIT_K"] == 4
    cuda = torch.device("cuda", 0)
    assert Q.choose_path(1, 4096, 12288, 4, 128, "none", bf16, cuda, sm_count=132)["SPLIT_K"] == 16
    assert Q.choose_path(1, 4096, 12288, 4, 128, "fp8", f32, cuda, sm_count=132)["SPLIT_K"] == 16
    gen = _gen("g1pdenorm6")
    pw6 = _packed(gen, 16, 64, 6, 32, False)
    x = torch.randn(1, 64, generator=gen).to(bf16)
    with pytest.raises(ValueError, match="DENORM unpack reads one bit plane"):
        Q._launch(x, pw6.qweight, pw6.scales, pw6.zeros, None, None, 6, 32, 64, "none",
                  interpreter=True, path=dict(_path(1, 32), DENORM=1))


@pytest.mark.parametrize("bits,group,sym,subs,M,dtype,even", [
    (4, 128, False, 2, 1, bf16, False), (4, 64, True, 4, 3, f16, False),
    (8, -1, True, 2, 1, bf16, False), (2, 64, False, 4, 1, f16, False),
    (6, 64, False, 2, 3, bf16, False), (4, 128, False, 2, 1, f32, True),
    (8, -1, True, 4, 2, bf16, True), (6, 128, True, 4, 1, f16, True),
])
def test_gemv1p_column_subtiles(bits, group, sym, subs, M, dtype, even):
    # SUBS column sub-tiles per thread: columns h * BLOCK_N / SUBS + c of each block, N off the
    # blocks (the last block's second sub-tile partly or wholly past N) or EVEN, split-K by
    # tickets, with the launcher's unpack (denormal for 4 and 2 bits, 8-bit both ways).
    gen = _gen(f"g1psubs{bits}{group}{sym}{subs}{M}{dtype}{even}")
    N, K = (128, 256) if even else (70, 384 if group != -1 else 83)
    pw = _packed(gen, N, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    path = dict(_path(M, group, block_n=64, split=2), SUBS=subs)
    _check(x, pw, bias, path=path)
    if bits == 8:
        _check(x, pw, bias, path=dict(path, DENORM=1))


def test_gemv1p_column_subtiles_exactly():
    # Every code in every position with two sub-tiles of 8 columns: bit for bit as the one-hot
    # test above (fp16 output).
    bits, N, K = 4, 16, 32
    codes = (torch.arange(N)[:, None] + torch.arange(K)[None, :] * 3) % N
    scales = (torch.rand(1, N, generator=_gen("g1psubsexact")) * 0.02 + 0.002).half()
    zeros = torch.randint(0, N, (1, N), generator=_gen("g1psubsexactz")).to(torch.uint8)
    pw = P.pack(codes, scales, zeros, bits, -1)
    for first in (0, 16):
        x = torch.zeros(16, K, dtype=f16)
        x[torch.arange(16), first + torch.arange(16)] = 1.0
        out = Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, bits, -1, K, "none",
                        interpreter=True, path=dict(_path(16, -1, block_n=16, block_k=32),
                                                    SUBS=2))
        assert torch.equal(out, _exact(x, pw, None, None, "none").to(f16))


def test_gemv1p_refuses_bad_subtiles():
    gen = _gen("g1psubsbad")
    pw = _packed(gen, 16, 64, 4, 32, False)
    x = torch.randn(1, 64, generator=gen).to(bf16)
    for subs, bn in ((3, 64), (4, 8)):
        with pytest.raises(ValueError, match="SUBS .* must be 1, 2 or 4"):
            Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 32, 64, "none",
                      interpreter=True, path=dict(_path(1, 32, block_n=bn), SUBS=subs))


def test_decode_kernels_compile_for_sm90_with_pdl_where_asked():
    # Programmatic dependent launch (session 23): gemv1p loads its first K block's words, then
    # waits for the kernel before it (griddepcontrol.wait) before x or any store; the swapped
    # tile waits first. Without PDL neither instruction is there. Compiled for an H200 (no
    # GPU needed): Triton's interpreter runs no inline assembly.
    got = json_without_interpreter("""
        import json, os, re, sys
        sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(os.pathsep)[0], "bench"))
        import compile_qlinear_sm90 as C
        from q3n_compile.kernels import qlinear as Q

        def order(ptx):
            marks = [(m.start(), m.group(0)) for m in re.finditer(
                r"griddepcontrol\\.(wait|launch_dependents)|ld\\.global\\S*|st\\.global\\S*|"
                r"atom\\.global\\S*|red\\.global\\S*", ptx)]
            wait = next((i for i, (_, t) in enumerate(marks) if t == "griddepcontrol.wait"), None)
            before = [t for _, t in marks[:wait]] if wait is not None else []
            gdc = [i for i, (_, t) in enumerate(marks) if t.startswith("griddepcontrol")]
            between = [t for _, t in marks[gdc[0] + 1:gdc[-1]]] if len(gdc) == 2 else []
            return dict(gdc=[t for _, t in marks if t.startswith("griddepcontrol")],
                        loads_before=sum(t.startswith("ld.global") for t in before),
                        loads_between=sum(t.startswith("ld.global") for t in between),
                        stores_before=sum(not t.startswith(("ld.", "griddep")) for t in before))

        out = {}
        for pdl in (0, 1):
            k = C.compile_variant(Q, "gemv1p", dict(
                BITS=4, GROUP=128, SYM=False, ACT=0, ACT_GROUP=0, HAS_BIAS=False, REDUCE=2,
                BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, PREFETCH=1, EVEN=True, DENORM=1, SUBS=1,
                stride_xk=1, stride_yn=1, x_type="*bf16", PDL=pdl), 4, 1)
            out[f"gemv1p{pdl}"] = order(k.asm["ptx"])
            k = C.compile_variant(Q, "mmT", dict(
                BITS=4, GROUP=128, SYM=False, HAS_BIAS=False, REDUCE=2, F32=False, XPERM=True,
                BLOCK_M=32, BLOCK_N=64, stride_xk=1, stride_yn=1, ASM=True, XCODES=0, PDL=pdl),
                4, 3)
            out[f"mmT{pdl}"] = order(k.asm["ptx"])
            k = C.compile_variant(Q, "act_quant", dict(
                QMAX=127.0, FP8=False, HAS_SMOOTH=True, BLOCK_M=1, BLOCK_K=4096, ACT_GROUP=0,
                DEQUANT=False, PERM128=False, stride_xk=1, PDL=pdl), 16, 1)
            out[f"act_quant{pdl}"] = order(k.asm["ptx"])
        print(json.dumps(out))
    """)
    for kernel in ("gemv1p", "mmT", "act_quant"):
        assert got[f"{kernel}0"]["gdc"] == [], got
        assert got[f"{kernel}1"]["stores_before"] == 0, got
    # The tile and the activations' quantizer (one program a row) let the next kernel start at
    # once, and read nothing before the wait; the GEMV triggers after its K loop (its grid is
    # several waves: dependents made resident early would hold its later waves' slots).
    for kernel in ("mmT", "act_quant"):
        assert got[f"{kernel}1"]["gdc"] == ["griddepcontrol.launch_dependents",
                                             "griddepcontrol.wait"], got
        assert got[f"{kernel}1"]["loads_before"] == 0, got
    assert got["gemv1p1"]["gdc"] == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]
    assert got["gemv1p1"]["loads_between"] >= 1, got
    # The GEMV's first words (16-byte loads) are in flight before the wait; the tile loads
    # nothing before it.
    assert got["gemv1p1"]["loads_before"] >= 1, got


def test_pdl_only_where_a_gpu_can_launch_it_and_inductor_does_not(monkeypatch):
    from torch._inductor import config as inductor_config

    from q3n_compile.kernels import contract

    assert not contract.pdl_capable(torch.device("cpu"))
    # An sm_90 GPU, as the launcher sees it: PDL unless Inductor launches its own kernels so
    # (its kernels may then skip a wait that q3n's early triggers make necessary).
    monkeypatch.setattr(contract, "backend_for", lambda device: "triton")
    monkeypatch.setattr(contract, "device_capability", lambda index: (9, 0))
    gpu = torch.device("cuda", 0)
    with inductor_config.patch({"triton.enable_pdl": False}):
        assert not contract.inductor_pdl() and contract.pdl_capable(gpu)
    with inductor_config.patch({"triton.enable_pdl": True}):
        assert contract.inductor_pdl() and not contract.pdl_capable(gpu)
    monkeypatch.setattr(contract, "device_capability", lambda index: (8, 9))
    assert not contract.pdl_capable(gpu)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M,N,K,path", [(1, 4096, 4096, "gemv1p"), (1, 12288, 4096, "gemv1p"),
                                        (16, 4096, 4096, "dispatch"),
                                        (32, 12288, 4096, "dispatch")])
def test_gpu_decode_pdl_chain_in_a_cuda_graph_reads_this_replays_x(M, N, K, path):
    # Launched with PDL (asked for: the dispatch leaves it off with 16-bit x), the decode GEMV
    # and the swapped tile (with x's permutation at 17-32 rows) may start before the kernel
    # ahead of them has finished and must wait for it before reading x: three linears in a row,
    # each reading the one before's output, replayed with a new x each time against float64 (a
    # read of a stale x gives the previous replay's product).
    assert torch.cuda.get_device_capability() < (9, 0) or Q.contract.pdl_capable(
        torch.device("cuda"))
    gen = _gen(f"decodepdl{M}{N}{K}{path}")
    pws = [_packed(gen, N, K, 4, 128, False, device="cuda"),
           _packed(gen, K, N, 4, 128, False, device="cuda"),
           _packed(gen, N, K, 4, 128, False, device="cuda")]
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()

    def forced(pw, a):
        if path == "dispatch":
            # The dispatched swapped tile, with PDL asked for (the dispatch leaves it off).
            return dict(Q.choose_path(a.shape[0], pw.qweight.shape[1], pw.in_features, 4, 128,
                                      "none", a.dtype, a.device), PDL=True)
        return dict(Q.gemv1p_config(a.shape[0], pw.qweight.shape[1], pw.in_features, 128,
                                    sms=132, bits=4, x_dtype=a.dtype), PDL=True)

    _replay_with_new_x(*_w4a16_chain(pws, forced), x, gen, eager_equal=False)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M,bits,act,N,K", [
    (1, 4, "int8", 4096, 4096), (1, 4, "fp8", 12288, 4096), (1, 6, "int12", 4096, 4096),
    (1, 4, "int8", 4096, 12288), (16, 4, "int8", 4096, 4096), (16, 6, "int12", 4096, 4096),
    (24, 4, "fp8", 12288, 4096)])
def test_gpu_quantized_activations_pdl_chain_in_a_cuda_graph(M, bits, act, N, K):
    # With quantized activations the activations' quantizer and the kernel after it are
    # launched with PDL: at one row as dispatched (GEMV1P_PDL_AFTER_QUANT, the GEMV reading the
    # codes), at 2-32 rows where a launch asks for it (the swapped tile reading x dequantised;
    # MMT_PDL_AFTER_QUANT leaves it off): the quantizer lets that kernel start at once, and it
    # must wait before it reads what the quantizer wrote. Three linears in a row replayed from
    # a CUDA graph with a new x each time must equal the same calls made eagerly (every kernel
    # is deterministic; a read of the previous replay's codes would differ), and float64.
    if act == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 activations need sm_89+")
    assert Q.GEMV1P_PDL_AFTER_QUANT
    gen = _gen(f"quantpdl{M}{bits}{act}{N}{K}")
    pws = [_packed(gen, N, K, bits, 128, False, device="cuda"),
           _packed(gen, K, N, bits, 128, False, device="cuda"),
           _packed(gen, N, K, bits, 128, False, device="cuda")]
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()

    def chain(a):
        for pw in pws:
            cfg = Q.choose_path(M, pw.qweight.shape[1], pw.in_features, bits, 128, act, a.dtype,
                                a.device)
            assert cfg["path"] == ("gemv1p" if M == 1 else "mmT")
            if M == 1:  # as dispatched
                a = torch.ops.q3n.qlinear(a, pw.qweight, pw.scales, pw.zeros, None, None, bits,
                                          128, pw.in_features, act, Q.PER_TOKEN)
            else:  # PDL asked for
                a = Q._launch(a, pw.qweight, pw.scales, pw.zeros, None, None, bits, 128,
                              pw.in_features, act, interpreter=False, path=dict(cfg, PDL=True))
            a = a * 0.05
        return a

    def exact(a):
        for pw in pws:
            a = Q.reference(a.double(), pw.qweight, pw.scales, pw.zeros, None, None, bits, 128,
                            pw.in_features, act, Q.PER_TOKEN).double().to(bf16).double() * 0.05
        return a

    _replay_with_new_x(chain, exact, x, gen, eager_equal=True)
