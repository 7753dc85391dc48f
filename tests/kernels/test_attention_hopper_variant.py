"""The prefill kernel's Hopper variant (TMA loads) and its fallbacks.

CPU lane: Triton 3.6's interpreter runs tensor descriptors (``tl.make_tensor_descriptor``), so
the variant itself runs here on small odd shapes: against a float64 reference and bit for bit
against the pointer kernel; inputs off the descriptor rules must run the pointer kernel with its
exact result. One test compiles the variant for an H200 (sm_90) without a GPU and reads Triton's
IR: TMA copies. GPU lane (-m gpu): the variant on CUDA at realistic lengths, in a CUDA graph
and in a thread that never set an allocator. The warp-specialised key loop that once sat next to
it gave NaN on an H200 (Triton 3.6) and was removed; asking for it must raise.
"""

import contextvars
import textwrap
import threading
import types
import zlib

import pytest
import torch

from q3n_compile.kernels import attention as A
from q3n_compile.kernels import attention_blocks as AB
from q3n_compile.kernels import contract

from .subprocess_lane import run_without_interpreter
from .test_attention import (TOL, _bench_module, _exact, _qkv, _randn, bf16, f16, f32,  # noqa: F401
                             fresh_plans)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# The CPU lane's kernel tests need the interpreter (set by conftest when there is no GPU).
needs_interpreter = pytest.mark.skipif(not contract.interpreter_enabled(),
                                       reason="runs the kernel in Triton's CPU interpreter")

TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)  # the interpreter's tiles
TMA = dict(TILES, tma=True)


def _run(q, k, v, mask=None, causal=False, blocks=TILES):
    interpreter = contract.backend_for(q.device) == "interpreter"
    return A._launch(q, k, v, mask, None, causal, interpreter, blocks=blocks)


def _check_variant(q, k, v, mask=None, causal=False, blocks=TMA, expect_tma=True):
    """The variant's output: within TOL of float64, and the pointer kernel's bit for bit (same
    loaded values, same math: the interpreter has no other rounding to differ in)."""
    ran = A.prefill_variant(q, k, v, mask, None, causal, blocks=blocks)
    assert ran["tma"] is expect_tma, ran
    out = _run(q, k, v, mask, causal, blocks)
    err = (out.double() - _exact(q, k, v, mask, None, causal)).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs err {err:.3g} > {TOL[q.dtype]:.3g} ({ran})"
    assert torch.equal(out, _run(q, k, v, mask, causal, TILES)), ran
    return ran


# (B, Hq, Hkv, Sq, Sk, D, dtype, causal): lengths off the 16-row tiles, head dims off the
# 16-column ones (the descriptor pads both), GQA groups 1, 2 and 4.
CASES = {
    "f32_d40": (1, 2, 2, 37, 29, 40, f32, False),
    "f16_causal_gqa2_d64": (1, 4, 2, 37, 37, 64, f16, True),
    "bf16_short_q_gqa4_d24": (1, 4, 1, 19, 45, 24, bf16, False),
    "bf16_causal_gqa2_d40": (1, 2, 1, 37, 37, 40, bf16, True),
    "f16_causal_long_q": (2, 2, 2, 33, 21, 16, f16, True),  # Sq > Sk
    "f32_gqa2_d24": (1, 2, 1, 21, 50, 24, f32, False),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_variant_against_float64_and_pointer_kernel(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, causal = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    ran = _check_variant(*_qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype), causal=causal, blocks=TMA)
    assert ran == dict(tma=True, fallback=None)


@needs_interpreter
def test_masks_run_with_tma():
    # Masks stay pointer loads next to the descriptors.
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen, 2, 2, 1, 21, 35, 16, f16)
    keep = torch.rand(2, 1, 21, 35, generator=gen) > 0.3
    keep[1, :, 4] = False  # a fully masked row: 0
    bias = 2 * torch.randn(21, 35, generator=gen)
    bias[:, 20:] = float("-inf")
    for mask, causal in ((keep, False), (bias, True)):
        assert _check_variant(q, k, v, mask, causal) == dict(tma=True, fallback=None)


@needs_interpreter
def test_strided_layouts_within_the_rules_use_tma():
    # [B, S, H, D] projections seen as [B, H, S, D] (HF's transpose) and a fused KV buffer.
    gen = torch.Generator().manual_seed(2)
    B, S, Hq, Hkv, D = 2, 27, 4, 2, 16
    q = _randn(gen, B, S, Hq, D, dtype=bf16).transpose(1, 2)
    kv = _randn(gen, B, S, 2, Hkv, D, dtype=bf16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    _check_variant(q, k, v, causal=True)


def _off_rules(gen):
    """(what, q, k, v): inputs that break one descriptor rule each."""
    q, k, v = _qkv(gen, 1, 2, 1, 23, 30, 20, f16)  # rows of 40 bytes
    yield "row stride", q, k, v
    q, k, v = _qkv(gen, 1, 2, 1, 23, 30, 16, f16)
    k_t = _randn(gen, 1, 1, 16, 30, dtype=f16).transpose(2, 3)  # head dim strided
    yield "head dim is strided", q, k_t, v
    odd = _randn(gen, 2 * 23 * 16 + 1, dtype=f16)  # heads 23*16+1 elements apart
    q_odd = odd.as_strided((1, 2, 23, 16), (2 * (23 * 16 + 1), 23 * 16 + 1, 16, 1))
    yield "head stride", q_odd, k, v


@needs_interpreter
def test_inputs_off_the_descriptor_rules_run_the_pointer_kernel():
    gen = torch.Generator().manual_seed(3)
    for what, q, k, v in _off_rules(gen):
        ran = _check_variant(q, k, v, causal=True, blocks=TMA, expect_tma=False)
        assert ran["fallback"] and what in ran["fallback"], (what, ran)


@needs_interpreter
def test_misaligned_pointers_fall_back_per_call(fresh_plans):
    # Same shapes and strides, data 4 bytes off a 16-byte boundary: one plan, two kernels.
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(gen, 1, 2, 1, 18, 25, 16, f32)
    buf = torch.empty(k.numel() + 4)
    k_off = buf[1:1 + k.numel()].view(k.shape).copy_(k)
    assert k.data_ptr() % 16 == 0 and k_off.data_ptr() % 16 == 4
    assert _check_variant(q, k, v)["tma"]
    plans = len(A._PLANS)
    ran = _check_variant(q, k_off, v, expect_tma=False)
    assert "16-byte boundary" in ran["fallback"] and len(A._PLANS) == plans
    torch.testing.assert_close(_run(q, k_off, v, blocks=TMA), _run(q, k, v, blocks=TMA),
                               atol=0, rtol=0)


@needs_interpreter
def test_launch_parameters_are_validated():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(gen, 1, 1, 1, 17, 17, 16, f32)
    with pytest.raises(ValueError, match="unknown prefill launch parameters.*'TMA'"):
        _run(q, k, v, blocks=dict(TILES, TMA=True))


def test_warp_specialize_was_removed():
    # It computed NaN on an H200 (Triton 3.6): a stale script asking for it must fail loudly,
    # not time the TMA or pointer kernel under its name.
    why = "removed.*NaN on an H200 with Triton 3.6.*2026-11-29.*11 of 12 shapes"
    for cfg in (dict(TILES, tma=True, warp_specialize=True), dict(TILES, warp_specialize=True)):
        with pytest.raises(ValueError, match=why):
            A._hopper_request(cfg)
    assert A.HOPPER_KEYS == ("tma",) and "warp_specialize" not in AB.Blocks._fields
    if contract.interpreter_enabled():  # and through the op's launch path
        q, k, v = _qkv(torch.Generator().manual_seed(7), 1, 1, 1, 17, 17, 16, f32)
        with pytest.raises(ValueError, match=why):
            _run(q, k, v, blocks=dict(TILES, tma=True, warp_specialize=True))


def test_refusal_reasons():
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, kv = torch.empty(1, 8, 300, 128, **meta), torch.empty(1, 2, 300, 128, **meta)
    cfg = dict(BLOCK_M=128, BLOCK_N=64)
    assert A.tma_refusal(q, kv, kv, cfg, 9) is None and A.tma_refusal(q, kv, kv, cfg, None) is None
    assert "sm_90" in A.tma_refusal(q, kv, kv, cfg, 8)
    assert "256" in A.tma_refusal(q, kv, kv, dict(BLOCK_M=512, BLOCK_N=64), 9)
    empty = torch.empty(1, 2, 0, 128, **meta)
    assert "no keys" in A.tma_refusal(q, empty, empty, cfg, 9)
    # A batch stride off the rules matters only when there is more than one batch.
    odd_b = (7, 300 * 128, 128, 1)
    one = torch.empty(1, 8, 300, 128, **meta).as_strided((1, 8, 300, 128), odd_b)
    assert A.tma_refusal(one, kv, kv, cfg, 9) is None
    two = torch.empty(2, 8, 300, 128, **meta).as_strided((2, 8, 300, 128), odd_b)
    assert "batch stride" in A.tma_refusal(two, kv, kv, cfg, 9)


@needs_interpreter
def test_default_launches_keep_the_variant_off(monkeypatch, fresh_plans):
    for row in AB.BLOCK_TABLE.values():
        assert not any(cfg.tma for cfg in row)
    for d, causal, sk in ((64, False, 300), (128, True, 5000), (256, False, 20000)):
        assert set(A.choose_blocks(sk, sk, d, bf16, causal, arch=9)) == set(A._TILE_KEYS)
    gen = torch.Generator().manual_seed(6)
    q, k, v = _qkv(gen, 1, 2, 1, 33, 33, 16, bf16)
    assert A.prefill_variant(q, k, v) == dict(tma=False, fallback=None)
    assert A.prefill_variant(q[:, :, :3], k, v) is None  # decode: no prefill kernel
    # A table entry that turns it on (what an H200 measurement would justify) reaches the op.
    on = AB.Blocks(16, 16, 4, 1, tma=True)
    assert on.as_dict() == TMA
    monkeypatch.setattr(A, "choose_blocks", lambda *a, **kw: on.as_dict())
    A.clear_plans()
    assert A.prefill_variant(q, k, v)["tma"]
    torch.testing.assert_close(torch.ops.q3n.attention(q, k, v), _run(q, k, v), atol=0, rtol=0)


def test_scratch_allocator_is_installed_once_per_context():
    from triton.runtime import _allocation

    def fresh():
        assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
        A._ensure_scratch_allocator()
        assert _allocation._allocator.get() is A._scratch
        mine = lambda size, alignment, stream: None  # noqa: E731 - a user's own allocator
        _allocation._allocator.set(mine)
        A._ensure_scratch_allocator()
        assert _allocation._allocator.get() is mine  # kept

    errors = []
    thread = threading.Thread(target=lambda: _catch(errors, fresh))  # a context with none set
    thread.start()
    thread.join()
    assert not errors, errors


def _catch(errors, fn):
    try:
        contextvars.copy_context().run(fn)
    except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
        errors.append(exc)


# ---------------------------------------------------------------------------------------------
# The benchmark's --hopper-variants, without a GPU: configs, failure handling, the printed line


def test_bench_hopper_variants_logic(monkeypatch):
    bench = _bench_module()
    table = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    assert bench.hopper_variant_configs(table, 8) == [("default", [table])]
    assert bench.HOPPER_VARIANTS == ("default", "tma")  # tma_ws (NaN on an H200) was removed
    variants = dict(bench.hopper_variant_configs(table, 9))
    assert variants == {"default": [table],
                        "tma": [dict(table, tma=True), dict(table, tma=True, num_stages=2)]}
    # A config that fails to compile is recorded and the next one is tried; a wrong result is
    # recorded and not timed.
    want = torch.zeros(2, 3)

    def launch(q, k, v, mask, scale, causal, interpreter, blocks):
        if blocks["num_stages"] == 3:
            raise RuntimeError("PassManager::run failed\nreproducer ...")
        return want + (0.01 if blocks.get("tma") else 1.0)

    fake = types.SimpleNamespace(_launch=launch, prefill_variant=lambda *a, **kw: dict(
        tma=True, fallback=None))
    monkeypatch.setattr(bench, "A", fake)
    monkeypatch.setattr(bench, "bench", lambda fn, **kw: (fn(), 2.0)[1])
    row, out = bench._variant_row(None, None, None, True, want, 4e12, variants["tma"], want)
    assert row["blocks"]["num_stages"] == 2 and row["ms"] == 2.0 and row["tflops"] == 2000.0
    assert row["max_abs_diff_vs_default"] == pytest.approx(0.01)
    row, _ = bench._variant_row(None, None, None, True, want, 4e12, variants["tma"][:1], None)
    assert "PassManager::run failed" in row["error"] and "tflops" not in row
    row, _ = bench._variant_row(None, None, None, True, want, 4e12,
                                [dict(table, num_stages=2)], None)
    assert row["error"].startswith("wrong result") and "ms" not in row
    rows = [dict(D=128, S=4096, causal=True, variant="default", blocks=table, tflops=400.0,
                 ratio_vs_default=1.0, ran=dict(tma=False)),
            dict(D=128, S=4096, causal=True, variant="tma", blocks=dict(table, num_stages=2),
                 tflops=420.0, ratio_vs_default=1.05, ran=dict(tma=True))]
    line = bench.hopper_summary_line(rows)
    assert "400.0" in line and "420.0 (1.05x)-" in line and "error" not in line
    rows[1] = dict(rows[1], error="x", ran=None, tflops=None)
    assert "error" in bench.hopper_summary_line(rows)


# ---------------------------------------------------------------------------------------------
# Compiled for an H200 without one: a stand-in driver reports an sm_90 device, launches only
# compile (and record what reaches the launcher), and Triton's GPU IR shows what the variant is.

SM90_SCRIPT = textwrap.dedent(r'''
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    LAUNCHES = []

    class Launcher:  # stands in for Triton's C launcher of one compiled variant
        def __init__(self, src, metadata):
            pass

        def __call__(self, gx, gy, gz, stream, function, packed, meta, enter, exit_, *args):
            LAUNCHES.append((gx, gy, gz, enter is None,
                             tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a
                                   for a in args)))

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return (1, 1, 64, 0, 1024)

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    class SM90:
        utils, launcher_cls = Utils(), Launcher
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 7
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(SM90())
    torch.cuda.current_device = lambda: 0
    from q3n_compile.kernels import attention as A, attention_blocks as AB, contract

    contract.backend_for = lambda device: "triton"  # CPU tensors take the CUDA path
    AB.device_arch = lambda index: 9
    kernel = A.attention_fwd_kernel

    def compiled(blocks, mask=None, causal=True):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 300, 64, generator=g).bfloat16()
        k, v = (torch.randn(1, 2, 300, 64, generator=g).bfloat16() for _ in range(2))
        seen = {id(c) for cache in kernel.device_caches.values() for c in cache[0].values()}
        del LAUNCHES[:]
        for _ in range(2):
            A._launch(q, k, v, mask, None, causal, False, blocks=blocks)
        new = [c for cache in kernel.device_caches.values() for c in cache[0].values()
               if id(c) not in seen]
        assert len(new) == 1, new
        # The second call takes the cached launcher with the first call's arguments (but for
        # the output, allocated per call).
        (first, second) = LAUNCHES
        assert not first[3] and second[3] and first[:3] == second[:3]
        assert first[4][:4] == second[4][:4] and first[4][5:] == second[4][5:]
        return new[0]

    tiles = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)
    tma = compiled(dict(tiles, tma=True))
    keep = torch.rand(300, 300) > 0.2
    masked = compiled(dict(tiles, tma=True), mask=keep)
    for c in (tma, masked):
        ir = c.asm["ttgir"]
        assert "async_tma_copy_global_to_local" in ir  # the TMA unit loads the tiles
        assert c.metadata.global_scratch_size > 0  # in-kernel descriptors
        assert c.metadata.shared <= 227 * 1024
        assert "ttg.warp_specialize" not in ir and c.metadata.num_warps == 4
    print("ok")
''')


def test_variant_compiles_for_sm90():
    run_without_interpreter(SM90_SCRIPT)


# ---------------------------------------------------------------------------------------------
# GPU lane: the variant on CUDA at realistic lengths (float64 reference computed on the GPU).

needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available()
                                or torch.cuda.get_device_capability()[0] < 9,
                                reason="needs an sm_90+ GPU (TMA)")

# (B, Hq, Hkv, Sq, Sk, D, dtype, causal, mask kind, launch parameters)
_T128 = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=True)
_T128_W4 = dict(_T128, num_warps=4)
GPU_CASES = {
    "gqa32_8_causal_d128_bf16": (1, 32, 8, 4099, 4099, 128, bf16, True, None, _T128),
    "w4_gqa32_8_causal_d128_bf16": (1, 32, 8, 4099, 4099, 128, bf16, True, None, _T128_W4),
    "d64_f16": (2, 16, 16, 1531, 1531, 64, f16, False, None, _T128_W4),
    "d80_causal_bf16": (1, 8, 8, 1037, 1037, 80, bf16, True, None, _T128_W4),
    "padding_bool_d128_bf16": (2, 32, 8, 1003, 2049, 128, bf16, False, "padding", _T128),
    "additive_causal_d64_f16": (1, 16, 16, 2047, 2047, 64, f16, True, "additive", _T128),
    "f32_causal_d128": (1, 8, 8, 1029, 1029, 128, f32, True, None,
                        dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, tma=True)),
}


def _gpu_mask(kind, gen, B, Sq, Sk):
    if kind == "padding":
        keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool, device="cuda")
        keep[-1, ..., Sk - 300:] = False
        return keep
    if kind == "additive":
        return torch.randn(Sq, Sk, generator=gen, device="cuda")
    return None


def _gpu_check(q, k, v, mask, causal, blocks):
    ran = A.prefill_variant(q, k, v, mask, None, causal, blocks=blocks)
    assert ran["tma"], ran  # no silent fallback where the variant should run
    out = A._launch(q, k, v, mask, None, causal, False, blocks=blocks)
    exact = _exact(q, k, v, mask, None, causal)
    err = (out.double() - exact).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs err {err:.3g} ({ran})"
    pointer = {key: val for key, val in blocks.items() if key not in A.HOPPER_KEYS}
    base = A._launch(q, k, v, mask, None, causal, False, blocks=pointer)
    base_err = (base.double() - exact).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)  # no farther than the pointer kernel
    return out


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_variant_against_float64(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, causal, kind, blocks = GPU_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(case.encode()))
    q, k, v = _qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype, device="cuda")
    _gpu_check(q, k, v, _gpu_mask(kind, gen, B, Sq, Sk), causal, blocks)


@pytest.mark.gpu
@needs_sm90
def test_gpu_strided_misaligned_and_captured():
    gen = torch.Generator(device="cuda").manual_seed(21)
    B, S, Hq, Hkv, D = 2, 1543, 32, 8, 128
    q = _randn(gen, B, S, Hq, D, dtype=bf16, device="cuda").transpose(1, 2)
    kv = _randn(gen, B, S, 2, Hkv, D, dtype=bf16, device="cuda")
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    want = _gpu_check(q, k, v, None, True, _T128)
    # Data 2 bytes off a 16-byte boundary: the pointer kernel runs instead, and is right.
    buf = torch.empty(k.numel() + 8, dtype=bf16, device="cuda")
    k_off = buf[1:1 + k.numel()].view(k.contiguous().shape).copy_(k)
    assert not A.prefill_variant(q, k_off, v, None, None, True, blocks=_T128)["tma"]
    out = A._launch(q, k_off, v, None, None, True, False, blocks=_T128)
    err = (out.double() - _exact(q, k, v, None, None, True)).abs().max().item()
    assert err <= TOL[bf16], err
    # In a CUDA graph (the descriptors' scratch comes from the graph's pool) and in a thread
    # that never set Triton's allocator.
    fn = lambda: A._launch(q, k, v, None, None, True, False, blocks=_T128)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, want, atol=0, rtol=0)
    results = []
    thread = threading.Thread(target=lambda: results.append(fn()))
    thread.start()
    thread.join()
    torch.testing.assert_close(results[0], want, atol=0, rtol=0)
