"""q3n::qlinear's "wg" path (kernels/qlinear_wgmma.py, a Gluon kernel: sm_90 only, no
interpreter). CPU lane: the kernel compiles for sm_90 (Triton's frontend and the wheel's ptxas
run anywhere) at the launches the dispatch uses, without spilling, and its PTX unpack matches
the definition of (q - z) * s bit for bit (emulated). GPU lane (-m gpu, an H200): against
float64 at odd shapes, both dtypes, bias, K split; and the dispatch choosing it."""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_swap as SW
from q3n_compile.kernels import qlinear_wgmma as WG

from .subprocess_lane import json_without_interpreter
from .test_qlinear import TOL, _gen, _packed, _replay_with_new_x, _w4a16_chain, bf16, f16
from .test_qlinear import _check as check_against_float64

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_hopper = pytest.mark.skipif(not torch.cuda.is_available()
                                  or torch.cuda.get_device_capability() != (9, 0),
                                  reason="needs an sm_90 GPU (warpgroup MMA)")

_TYPES = {"X": "*bf16", "QW": "*i32", "S": "*fp16", "Z": "*u8", "BIAS": "*bf16", "Y": "*bf16",
          "WS": "*fp32", "CNT": "*i32", "XS": "*fp32", "XSC": "*fp32"}
_DIVISIBLE = ("X", "QW", "S", "Z", "Y", "WS", "N", "K_PAD", "KX", "K_PER_SPLIT", "stride_xm",
              "stride_ym")


def _compile_sm90(cfg: dict, x_type: str, reduce: int, bias: bool, sym: bool, bits: int) -> dict:
    """Registers, stack bytes, shared bytes and the K loop's MMAs and MMA waits of the kernel
    compiled for sm_90 (call it in a process that has not run Triton's interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = WG.qlinear_wg_kernel
    names = kernel.arg_names
    ce = dict(BITS=bits, SYM=sym, HAS_BIAS=bias, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
              STAGES=cfg["STAGES"], REDUCE=reduce, LOOKAHEAD=cfg.get("LOOKAHEAD", 1), PDL=True,
              SCALE_AFTER=cfg.get("SCALE_AFTER", False), XSUM=cfg.get("XSUM", False),
              X_TMA=cfg.get("X_TMA", False))
    y_type = "*bf16" if x_type == "*fp8e4nv" else x_type
    types = dict(_TYPES, X=x_type, Y=y_type, BIAS=y_type,
                 XD=_x_descriptor_type(x_type, cfg["BLOCK_M"]) if ce["X_TMA"] else x_type)
    sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in names}
    src = GluonASTSource(fn=kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in ce.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]] for n in _DIVISIBLE})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], "launch_pdl": True})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    loop = _loop_body(sass)
    return dict(regs=int(re.search(r"REG:(\d+)", usage).group(1)),
                pdl=compiled.metadata.launch_pdl,
                gdc=[op for op in ("griddepcontrol.wait", "griddepcontrol.launch_dependents")
                     if op in compiled.asm["ptx"]],
                stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                shared=compiled.metadata.shared,
                mmas=sum("HGMMA" in i for i in loop),
                hmul2=sum(i.startswith("HMUL2") for i in loop),
                # 16-bit adds (HADD2.F32 is fp16 -> fp32, the scales' conversion)
                hadd2=sum(i.startswith("HADD2") and not i.startswith("HADD2.F32")
                          for i in loop),
                ffma=sum(i.startswith("FFMA") for i in loop),
                waits=[i for i in loop if "WARPGROUP.DEPBAR" in i],
                barriers=sum("BAR.SYNC" in i for i in loop),
                cp_async=sum("LDGSTS" in i for i in loop),
                tma=sum("UTMALDG" in i for i in loop),
                loop=len(loop))


def _x_descriptor_type(x_type: str, block_m: int) -> str:
    """The signature type Triton gives X_TMA's descriptor of x (what the launch passes)."""
    from triton.runtime.jit import native_specialize_impl

    dtype = {"*bf16": bf16, "*fp16": f16, "*fp8e4nv": torch.float8_e4m3fn}[x_type]
    desc = WG.x_descriptor(torch.zeros(block_m, 256, dtype=dtype), block_m)
    return native_specialize_impl(None, desc, False, True, True)[0]


# x, REDUCE (0 one program a tile, 2 K split, 3 stream-K), bias, sym, weight bits
_VARIANTS = [("*bf16", 0, False, False, 4), ("*fp16", 2, True, True, 4),
             ("*bf16", 2, True, False, 6), ("*fp16", 0, False, True, 6),
             ("*bf16", 3, True, False, 4), ("*fp16", 3, False, True, 6)]


def _dispatched_cases():
    """(tile, variant) for every dispatched tile and variant; 256-column tiles take 4-bit weights
    only."""
    return [(tile, v) for tile in WG.DISPATCH_TILES for v in _VARIANTS
            if not (tile["BLOCK_N"] == 256 and v[4] == 6)]


@pytest.fixture(scope="module")
def sm90_builds():
    """Every dispatched tile in its variants, compiled in one fresh process."""
    return json_without_interpreter("""
        import json
        from tests.kernels import test_qlinear_wgmma as T
        print(json.dumps([T._compile_sm90(tile, *v) for tile, v in T._dispatched_cases()]))
    """)


def test_dispatched_tiles_compile_for_sm90_without_spills(sm90_builds):
    cases = _dispatched_cases()
    assert len(sm90_builds) == len(cases) == 30
    for (tile, variant), got in zip(cases, sm90_builds):
        where = f"{tile} {variant}: {got}"
        assert got["stack"] == 0, where  # no spills
        assert got["shared"] <= 227 * 1024, where
        # 8 sub-tiles a K block, each a group of asynchronous MMAs (one a warpgroup's 64
        # weight columns: two at WIDE256); every wait in the loop leaves LOOKAHEAD groups in
        # flight (never "all done", which Triton's own tile waited for after each MMA); two
        # CTA barriers a K block (x's halves in separate allocations; three with one).
        lookahead = tile.get("LOOKAHEAD", 1)
        assert got["mmas"] == 8 * tile["BLOCK_N"] // (tile["num_warps"] // 4 * 64), where
        assert len(got["waits"]) == 8 and all(w.rstrip(" ;").endswith(f"0x{lookahead}")
                                    for w in got["waits"]), where
        assert got["barriers"] == 2, where
        # Launched with PDL: it waits for the kernel before it and lets the next one start.
        assert got["pdl"] and got["gdc"] == ["griddepcontrol.wait",
                                             "griddepcontrol.launch_dependents"], where


def _decode_cases():
    """(tile, variant) for the decode tiles as dispatched (SCALE_AFTER, stream-K; 6-bit weights
    on 128 columns, to 16 rows; XSUM at 32 rows), bf16 x (the rule's) and fp16 (forced
    launches, without XSUM)."""
    cases = []
    for rows, tile in WG.DECODE_TILES.items():
        for cols in (128, 256) if rows < 32 else (128,):
            for x_type, sym, bits in (("*bf16", False, 4), ("*fp16", True, 4),
                                      ("*bf16", False, 6), ("*bf16", True, 6)):
                if bits == 6 and (cols == 256 or rows == 32):
                    continue
                xsum = rows == 32 and x_type == "*bf16"
                cases.append((dict(tile, BLOCK_N=cols, SCALE_AFTER=True, XSUM=xsum),
                              (x_type, 3, bits == 4, sym, bits)))
    return cases


@pytest.fixture(scope="module")
def sm90_decode_builds():
    return json_without_interpreter("""
        import json
        from tests.kernels import test_qlinear_wgmma as T
        print(json.dumps([T._compile_sm90(tile, *v) for tile, v in T._decode_cases()]))
    """)


def test_decode_tiles_compile_for_sm90_without_spills(sm90_decode_builds):
    cases = _decode_cases()
    assert len(sm90_decode_builds) == len(cases) == 14
    for (tile, variant), got in zip(cases, sm90_decode_builds):
        where = f"{tile} {variant}: {got}"
        assert got["stack"] == 0 and got["shared"] <= 227 * 1024, where
        # SCALE_AFTER: the operand is q - z (no 16-bit multiply in the loop); each K block's
        # sum is scaled into the total in fp32, one FFMA an accumulator register
        # (BLOCK_N x BLOCK_M over 128 threads), two with XSUM (whose operand is M + q: no
        # 16-bit subtraction either); the block's MMAs are all retired first (a ninth wait,
        # "all done").
        regs = tile["BLOCK_N"] * tile["BLOCK_M"] // 128
        assert got["hmul2"] == 0, where
        assert got["ffma"] == (2 if tile["XSUM"] else 1) * regs, where
        assert (got["hadd2"] == 0) == tile["XSUM"], where
        assert got["mmas"] == 8 * tile["BLOCK_N"] // 64, where
        assert len(got["waits"]) == 9 and got["waits"][-1].rstrip(" ;").endswith("0x0"), where
        assert got["barriers"] == 2, where


def _loop_body(sass: str) -> list:
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            return [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
    raise AssertionError("no loop in the kernel")


def _run_pairs_ptx(asm: str, regs: dict, dtype) -> int:
    """Execute the PTX of the kernel's unpack on 32-bit ints (`regs`: "$1".. its operands):
    prmt (default mode), shr.b32 / shl.b32, mov.b32, lop3 (any 8-bit LUT), sub/mul on 16-bit
    pairs (each half rounded once to `dtype`, as the hardware's .rn); returns $0."""
    regs = dict(regs)

    def val(tok):
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0)

    def halves(v):
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(dtype)

    def join(h):
        u = h.view(torch.int16).to(torch.int32) & 0xFFFF
        return int(u[0]) | (int(u[1]) << 16)

    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        if op == "prmt.b32":
            # Default mode: selector nibble i picks byte (nibble & 7) of {b, a}; its bit 3
            # replicates that byte's sign bit instead.
            data = val(srcs[0]) | (val(srcs[1]) << 32)
            sel = val(srcs[2])
            out = 0
            for i in range(4):
                nib = (sel >> (4 * i)) & 0xF
                byte = (data >> (8 * (nib & 7))) & 0xFF
                if nib & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * i)
        elif op in ("xor.b32", "or.b32"):
            a, b = val(srcs[0]), val(srcs[1])
            out = a ^ b if op == "xor.b32" else a | b
        elif op == "shr.b32":
            out = val(srcs[0]) >> val(srcs[1])
        elif op == "shl.b32":
            out = val(srcs[0]) << val(srcs[1])
        elif op == "mov.b32":
            out = val(srcs[0])
        elif op == "lop3.b32":
            a, b, c, lut = (val(t) for t in srcs)
            out = 0
            for bit in range(32):
                idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                out |= ((lut >> idx) & 1) << bit
        elif op.startswith(("sub.rn.", "mul.rn.")):
            x, y = halves(val(srcs[0])).float(), halves(val(srcs[1])).float()
            out = join((x - y if op.startswith("sub") else x * y).to(dtype))
        else:
            raise AssertionError(f"unknown PTX {op}")
        regs[dst] = out & 0xFFFFFFFF
    return regs["$0"]


@pytest.mark.parametrize("dtype", [bf16, f16])
def test_pairs_ptx_is_q_minus_z_times_s(dtype):
    # Every code position j, random words, zero points and scales: the PTX's two results (one
    # per word) are (q - z) * s with s rounded to the pair's dtype and the product rounded
    # once, the definition the GPU test checks the kernel's output against.
    g = _gen(f"wgptx{dtype}")
    magic = 1024.0 if dtype == f16 else 128.0
    for _ in range(40):
        w1, w2 = (int(v) for v in torch.randint(0, 2 ** 32, (2,), generator=g, dtype=torch.int64))
        z = int(torch.randint(0, 16, (1,), generator=g))
        s = float((torch.rand(1, generator=g) * 0.05 + 1e-3).half())
        zb = _pair_of(magic + z, dtype)
        sb = _pair_of(s, dtype)
        for j in range(8):
            out = _run_pairs_ptx(WG._scaled_pairs_asm(j, dtype == f16),
                                 {"$1": w1, "$2": w2, "$3": zb, "$5": sb}, dtype)
            got = torch.tensor([out & 0xFFFF, out >> 16], dtype=torch.int32).to(torch.int16)
            got = got.view(dtype).float()
            for half, word in enumerate((w1, w2)):
                q = (word >> (4 * j)) & 0xF
                want = torch.tensor((q - z) * float(torch.tensor(s).to(dtype))).to(dtype)
                assert got[half].item() == want.float().item(), (j, half, q, z, s)


@pytest.mark.parametrize("dtype", [bf16, f16])
def test_code_pairs_ptx_is_q_minus_z(dtype):
    # SCALE_AFTER's unpack: the same two codes as q - z, exact (4-bit: $1, $2 the words, $3 the
    # pair M + z; 6-bit: the 2-bit plane's word as $3 = $4 and M + z as $5).
    g = _gen(f"wgcodes{dtype}")
    magic = 1024.0 if dtype == f16 else 128.0
    four = WG._CODES_F16 if dtype == f16 else WG._CODES_BF16
    six = WG._SIX_CODES_F16 if dtype == f16 else WG._SIX_CODES_BF16
    for _ in range(40):
        w1, w2, v = (int(t) for t in torch.randint(0, 2 ** 32, (3,), generator=g,
                                                   dtype=torch.int64))
        z4, z6 = (int(torch.randint(0, hi, (1,), generator=g)) for hi in (16, 64))
        if dtype == bf16:
            # XSUM's operand: M + q, nothing taken off (4-bit: $1, $2; 6-bit: and $3 = $4).
            for j in range(8):
                for bits, asm in ((4, WG._BIASED_BF16), (6, WG._SIX_BIASED_BF16)):
                    out = _run_pairs_ptx(asm.value[j], {"$1": w1, "$2": w2, "$3": v, "$4": v},
                                         dtype)
                    got = torch.tensor([out & 0xFFFF, out >> 16], dtype=torch.int32)
                    got = got.to(torch.int16).view(dtype).float()
                    for half, word in enumerate((w1, w2)):
                        q = (word >> (4 * j)) & 0xF
                        if bits == 6:
                            q += 16 * ((v >> (16 * half + 2 * j)) & 3)
                        assert got[half].item() == magic + q, (bits, j, half, q)
        for j in range(8):
            out4 = _run_pairs_ptx(four.value[j], {"$1": w1, "$2": w2,
                                                  "$3": _pair_of(magic + z4, dtype)}, dtype)
            out6 = _run_pairs_ptx(six.value[j], {"$1": w1, "$2": w2, "$3": v, "$4": v,
                                                 "$5": _pair_of(magic + z6, dtype)}, dtype)
            for out, six_bits in ((out4, False), (out6, True)):
                got = torch.tensor([out & 0xFFFF, out >> 16], dtype=torch.int32)
                got = got.to(torch.int16).view(dtype).float()
                for half, word in enumerate((w1, w2)):
                    q = (word >> (4 * j)) & 0xF
                    if six_bits:
                        q += 16 * ((v >> (16 * half + 2 * j)) & 3)
                    assert got[half].item() == q - (z6 if six_bits else z4), (j, half, q)


@pytest.mark.parametrize("dtype", [bf16, f16])
def test_six_pairs_ptx_is_q_minus_z_times_s(dtype):
    # 6-bit codes: the 4-bit plane's two words ($1, $2: rows r and r + 1) and the 2-bit plane's
    # word holding both rows ($3 = $4: row r's fields at bit 2j, row r + 1's at 16 + 2j), as
    # the kernel's 2-bit buffer gives them; q = q4 + 16 q2, then (q - z) * s as for 4 bits.
    g = _gen(f"wg6ptx{dtype}")
    magic = 1024.0 if dtype == f16 else 128.0
    for _ in range(40):
        w1, w2, v = (int(t) for t in torch.randint(0, 2 ** 32, (3,), generator=g,
                                                   dtype=torch.int64))
        z = int(torch.randint(0, 64, (1,), generator=g))
        s = float((torch.rand(1, generator=g) * 0.05 + 1e-3).half())
        regs = {"$1": w1, "$2": w2, "$3": v, "$4": v, "$5": _pair_of(magic + z, dtype),
                "$7": _pair_of(s, dtype)}
        for j in range(8):
            asm = SW._six_pairs_asm(j, dtype == f16, words=True, scaled=True)
            out = _run_pairs_ptx(asm, regs, dtype)
            got = torch.tensor([out & 0xFFFF, out >> 16], dtype=torch.int32).to(torch.int16)
            got = got.view(dtype).float()
            for half, word in enumerate((w1, w2)):
                q = ((word >> (4 * j)) & 0xF) + 16 * ((v >> (16 * half + 2 * j)) & 3)
                want = torch.tensor((q - z) * float(torch.tensor(s).to(dtype))).to(dtype)
                assert got[half].item() == want.float().item(), (j, half, q, z, s)


def test_fp8_quads_ptx_is_q_as_e4m3():
    # The fp8 form's unpack: byte j of two words ($1 = $2, $3 = $4) as four e4m3 bytes, codes
    # 2j and 2j + 1 of the first word then of the second, each the integer q exactly; every
    # nibble value at every position.
    g = _gen("wgfp8ptx")
    words = [int(v) for v in torch.randint(0, 2 ** 32, (40,), generator=g, dtype=torch.int64)]
    words += [0x76543210, 0xFEDCBA98]  # every nibble value, in both words' every position
    for w1, w2 in zip(words, words[1:] + words[:1]):
        for j in range(4):
            out = _run_pairs_ptx(WG._fp8_quads_asm(j), {"$1": w1, "$2": w1, "$3": w2,
                                                        "$4": w2}, bf16)
            got = torch.tensor([(out >> (8 * i)) & 0xFF for i in range(4)], dtype=torch.uint8)
            got = got.view(torch.float8_e4m3fn).float().tolist()
            want = [(w >> (4 * c)) & 0xF for w in (w1, w2) for c in (2 * j, 2 * j + 1)]
            assert got == want, (hex(w1), hex(w2), j)


def test_fp8_form_refuses_codes_out_of_order_and_wide_tiles():
    codes = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    sums, xs = torch.zeros(2, 4), torch.ones(4)
    qw, sc = torch.zeros(128, 64, dtype=torch.int32), torch.ones(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="e4m3 codes in fp8_block_order"):
        WG.run_fp8(codes[:, :200], sums, xs, qw, sc, None, None, 200, WG.TALL)
    with pytest.raises(ValueError, match="e4m3 codes in fp8_block_order"):
        WG.run_fp8(codes.float(), sums, xs, qw, sc, None, None, 256, WG.TALL)
    with pytest.raises(ValueError, match="at most 128 weight columns, not 256"):
        WG.run_fp8(codes, sums, xs, qw, sc, None, None, 256, WG.WIDE256)


@pytest.mark.parametrize("M,K", [(3, 128), (5, 300), (2, 1024)])
def test_fp8_block_order_matches_the_unpack(M, K):
    # Sub-tile j's operand K = 2r + h is code 2j + h of word row r, i.e. channel 8r + 2j + h
    # of the block: x in fp8_block_order has that channel at 32j + 2r + h, so the four
    # sub-tiles' products sum to x @ q^T; the sums are the codes' per block (zero padded).
    g = _gen(f"wgfp8order{M}{K}")
    codes = (torch.randn(M, K, generator=g) * 40).to(torch.float8_e4m3fn)
    q = torch.randint(0, 16, (7, K), generator=g)
    xk, sums = WG.fp8_block_order(codes)
    kb = -(-K // 128)
    assert xk.shape == (M, kb * 128) and xk.dtype == torch.float8_e4m3fn
    qp = torch.nn.functional.pad(q, (0, kb * 128 - K)).view(7, kb, 16, 8)  # [n, b, r, code]
    total = torch.zeros(M, 7, dtype=torch.float64)
    for b in range(kb):
        for j in range(4):
            xj = xk[:, b * 128 + 32 * j: b * 128 + 32 * j + 32].double()  # [M, kk]
            aj = qp[:, b, :, 2 * j: 2 * j + 2].reshape(7, 32).double()  # kk = 2r + h
            total += xj @ aj.t()
    want = codes.double() @ q.double().t()
    assert torch.equal(total, want)
    padded = torch.nn.functional.pad(codes.double(), (0, kb * 128 - K)).view(M, kb, 128)
    assert torch.allclose(sums.double(), padded.sum(2).t(), rtol=1e-6, atol=1e-3)


def _pair_of(v: float, dtype) -> int:
    """v as `dtype` in both halves of an int32 (the kernel's :func:`WG._pair_bits`)."""
    h = int(torch.tensor(v).to(dtype).view(torch.int16).to(torch.int32)) & 0xFFFF
    return h | (h << 16)


def test_dispatch_rule_on_sm90():
    cuda = torch.device("cuda")

    pdl = {}

    def path(M, N, K=4096, dtype=bf16, act="none", bits=4, group=128, cap=(9, 0), sym=False):
        # The one launch's tile (the op's row split: test_row_split_rule_on_sm90).
        cfg = Q.choose_path(M, N, K, bits, group, act, dtype, cuda, sm_count=132,
                            capability=cap, symmetric=sym, allow_row_split=False)
        if cfg["path"] == "wg":
            pdl[M, N, K] = cfg.pop("PDL")
        return cfg

    # PDL everywhere but grids of 67-132 programs of tiles that fit two an SM (s22run1-2).
    path(64, 12288), path(33, 4096), path(128, 1024), path(64, 1024), path(64, 28672)
    path(200, 4096)
    assert pdl == {(64, 12288, 4096): False, (33, 4096, 4096): True,
                   (128, 1024, 4096): False, (64, 1024, 4096): True,
                   (64, 28672, 4096): True, (200, 4096, 4096): True}

    # Few columns: 64 x 64 with K in 4 to 64 rows; 128 x 64 with K in 2 to 128 rows, unsplit
    # above, where its programs fill 0.72 of the SMs (4096 columns), with x by TMA and 5
    # stages for weights with zero points and 16-bit x (s37run4, s38run3); on fewer columns 64 x 64
    # with K in 4 to 128 rows (in 2 from 65 rows where 4 would make more programs than SMs:
    # 2048 columns) and dequantise + cuBLAS above for 16-bit x.
    assert path(32, 4096)["path"] == "mmT"
    for M, N, tile, split in ((33, 4096, WG.SMALL, 4), (48, 4096, WG.SMALL, 4),
                              (49, 4096, WG.SMALL, 4), (64, 4096, WG.SMALL, 4),
                              (65, 4096, WG.TALL_TMA, 2), (128, 4096, WG.TALL_TMA, 2),
                              (129, 4096, WG.TALL_TMA, 1), (256, 4096, WG.TALL_TMA, 1),
                              (64, 1024, WG.SMALL, 4), (65, 1024, WG.SMALL, 4),
                              (128, 1024, WG.SMALL, 4),
                              (65, 2048, WG.SMALL, 2), (128, 2048, WG.SMALL, 2)):
        assert path(M, N) == dict(tile, path="wg", SPLIT_K=split), (M, N)
    assert path(129, 1024)["path"] == "dequant" and path(256, 2048)["path"] == "dequant"
    # ... but quantized activations take 64 x 64 with K in 2 there (s21run7).
    for act in ("fp8", "int8", "int12"):
        for bits in (4, 6):
            for M, N in ((129, 1024), (256, 2048)):
                assert path(M, N, act=act, bits=bits) == dict(WG.SMALL, path="wg", SPLIT_K=2)
    # A split keeps two K blocks of 128 each: K = 384 (3 blocks) is not split.
    assert path(64, 4096, K=384)["SPLIT_K"] == 1 and path(64, 4096, K=1024)["SPLIT_K"] == 4
    # Wide weights (their 128 x 128 tiles fill 0.72 of the SMs): 64 x 128 to 64 rows; above,
    # 128 x 256 where those tiles fill 0.72 of the SMs (12288 columns from 129 rows, 28672 from
    # 65), else WIDE; by stream-K over the 132 SMs once the tiles make a wave (12288 columns
    # from 129 rows with WIDE, 28672 from 129 with WIDE256).
    assert path(32, 12288)["XSUM"]  # the decode tile (test_decode_rule_on_sm90)
    assert path(33, 28672) == dict(WG.SIXTY_FOUR256, path="wg", SPLIT_K=1)
    assert path(33, 12288) == dict(WG.SIXTY_FOUR, path="wg", SPLIT_K=1)
    assert path(49, 28672) == dict(WG.SIXTY_FOUR256, path="wg", SPLIT_K=1)
    assert path(64, 28672) == dict(WG.SIXTY_FOUR256, path="wg", SPLIT_K=1)
    assert path(64, 12288) == dict(WG.SIXTY_FOUR, path="wg", SPLIT_K=1)
    stream = dict(WG.WIDE, path="wg", SPLIT_K=1, STREAM=132)
    stream256 = dict(WG.WIDE256, path="wg", SPLIT_K=1, STREAM=132)
    for M in (65, 96, 128):
        # WIDE short of a wave: x by TMA and 5 stages for 4-bit weights with zero points and
        # 16-bit x (s38run3); plain WIDE for symmetric weights, quantized x and 6-bit weights.
        assert path(M, 12288) == dict(WG.WIDE_TMA, path="wg", SPLIT_K=1)
        assert path(M, 12288, sym=True) == dict(WG.WIDE, path="wg", SPLIT_K=1)
        assert path(M, 12288, act="int12") == dict(WG.WIDE, path="wg", SPLIT_K=1)
        assert path(M, 12288, bits=6) == dict(WG.WIDE, path="wg", SPLIT_K=1)
        assert path(M, 28672) == dict(WG.WIDE256, path="wg", SPLIT_K=1)
    for M in (129, 200, 256):
        assert path(M, 12288) == dict(WG.WIDE256, path="wg", SPLIT_K=1)
        assert path(M, 28672) == stream256
        # One wave of TALL programs: TALL with x by TMA (s37run4, 6-bit weights s38run3) at
        # any K; without (symmetric weights, quantized x) TALL to K 8192, WIDE with K split 2
        # above; more than a wave (5120 columns and up): WIDE by stream-K (s22run2-3).
        for bits in (4, 6):
            for K in (8192, 12288):
                assert path(M, 4096, K=K, bits=bits) == dict(WG.TALL_TMA, path="wg", SPLIT_K=1)
        assert path(M, 4096, K=12288, dtype=f16) == dict(WG.TALL_TMA, path="wg", SPLIT_K=1)
        # Symmetric weights keep TALL (X_TMA serialises their MMAs, s37run5).
        assert path(M, 4096, K=8192, sym=True) == dict(WG.TALL, path="wg", SPLIT_K=1)
        assert path(M, 4096, K=12288, sym=True) == dict(WG.WIDE, path="wg", SPLIT_K=2)
        assert path(M, 4096, K=12288, bits=6, act="int12") == dict(WG.WIDE, path="wg",
                                                                      SPLIT_K=2)
        assert path(M, 5120, K=5120) == stream and path(M, 6016, K=8192) == stream
        assert path(M, 5120, K=17408, bits=6) == stream
    for M in (65, 128):
        assert path(M, 5120) == stream
        assert path(M, 4096) == dict(WG.TALL_TMA, path="wg", SPLIT_K=2)
        assert path(M, 4096, sym=True) == dict(WG.TALL, path="wg", SPLIT_K=2)
        assert path(M, 4096, act="int12") == dict(WG.TALL, path="wg", SPLIT_K=2)
    # 6-bit weights: the same rule without WIDE256 (its shared memory would not fit).
    for M, N, tile, split in ((49, 4096, WG.SMALL, 4), (128, 4096, WG.TALL_TMA, 2),
                              (256, 4096, WG.TALL_TMA, 1), (64, 28672, WG.SIXTY_FOUR, 1),
                              (49, 28672, WG.SIXTY_FOUR, 1),
                              (128, 12288, WG.WIDE, 1)):
        assert path(M, N, bits=6) == dict(tile, path="wg", SPLIT_K=split), (M, N)
    assert path(200, 12288, bits=6) == stream and path(96, 28672, bits=6) == stream
    assert path(33, 4096, bits=6) == dict(WG.SMALL, path="wg", SPLIT_K=4)
    assert path(32, 4096, bits=6)["path"] == "mmT"
    # Above 256 rows only 4-bit weights with 16-bit x: of at least 2^27 entries to 768 rows, of
    # 3 * 2^25 to 512 (s28run3, s28run5-6); never for other formats, activations, dtypes,
    # widths or GPUs.
    assert path(257, 12288)["path"] == "dequant" and path(257, 28672, bits=6)["path"] == "dequant"
    for M in (257, 384, 768):
        assert path(M, 28672, K=8192) == stream256, M
        assert path(M, 16384, K=8192)["path"] == "wg", M  # 2^27 entries exactly
    assert path(769, 28672, K=8192)["path"] == "dequant"
    assert path(512, 16368, K=8192)["path"] == "wg"  # just under 2^27: to 512 rows
    assert path(513, 16368, K=8192)["path"] == "dequant"
    assert path(300, 28672)["path"] == "wg" and path(512, 14336, K=8192)["path"] == "wg"
    assert path(300, 24576)["path"] == "wg"  # 3 * 2^25 entries exactly
    assert path(300, 24560)["path"] == "dequant" and path(384, 8192, K=8192)["path"] == "dequant"
    assert path(384, 28672, K=8192, bits=6)["path"] == "dequant"
    for act in ("fp8", "int8", "int12"):
        assert path(384, 28672, K=8192, act=act)["path"] != "wg", act
    assert path(128, 4096, dtype=f16)["path"] == "wg"
    for kw in (dict(dtype=torch.float32), dict(bits=5), dict(bits=8), dict(group=64),
               dict(group=-1), dict(cap=(8, 0)), dict(cap=(10, 0))):
        assert path(128, 12288, **kw)["path"] != "wg", kw
    # Quantized activations (dequantised first) to 256 rows, ahead of mm8, cublas8 and
    # dequantise + cuBLAS; where cublas8 computes the call (fp8 codes and 4-bit weights from
    # 129) and K exceeds 8192, to 128 and again from 193 (s25run3).
    for act in ("fp8", "int8", "int12"):
        for bits in (4, 6):
            assert path(49, 4096, act=act, bits=bits) == dict(WG.SMALL, path="wg", SPLIT_K=4)
            # 33-48 rows: 4-bit weights on the wide tiles only (SMALL lost to mmT at 4096^2
            # with fp8 codes, s21run3); 6-bit weights on SMALL too (s21run5).
            if bits == 4:
                assert path(48, 4096, act=act, bits=bits)["path"] == "mmT"
            else:
                assert path(33, 4096, act=act, bits=bits) == dict(WG.SMALL, path="wg",
                                                                  SPLIT_K=4)
            assert path(33, 12288, act=act, bits=bits) == dict(WG.SIXTY_FOUR, path="wg",
                                                               SPLIT_K=1)
            assert path(32, 12288, act=act, bits=bits)["path"] == "mmT"
            assert path(128, 12288, act=act, bits=bits) == dict(WG.WIDE, path="wg", SPLIT_K=1)
    assert path(129, 28672, act="fp8") == stream256
    assert path(256, 12288, act="fp8") == dict(WG.WIDE256, path="wg", SPLIT_K=1)
    assert path(256, 4096, act="fp8") == dict(WG.TALL, path="wg", SPLIT_K=1)
    assert path(128, 4096, K=12288, act="fp8") == dict(WG.TALL, path="wg", SPLIT_K=2)
    assert path(129, 4096, K=12288, act="fp8")["path"] == "cublas8"
    assert path(192, 4096, K=14336, act="fp8")["path"] == "cublas8"
    for M in (193, 256):
        assert path(M, 4096, K=12288, act="fp8") == dict(WG.WIDE, path="wg", SPLIT_K=2)
    assert path(257, 12288, act="fp8")["path"] == "cublas8"
    for act, bits in (("int8", 4), ("int12", 4)):
        assert path(256, 28672, act=act, bits=bits) == stream256
    for act, bits in (("fp8", 6), ("int8", 6), ("int12", 6)):
        assert path(256, 28672, act=act, bits=bits) == stream
    assert path(128, 12304)["path"] == "wg" and path(128, 12296)["path"] != "wg"  # N % 16
    # allow_wg=False (the codes op where mmT reads the codes): the table of before.
    assert Q.choose_path(128, 12288, 4096, 4, 128, "fp8", bf16, cuda, sm_count=132,
                         capability=(9, 0), allow_wg=False)["path"] == "mm8"
    # Without a GPU (capability unknown) the table of before.
    assert Q.choose_path(128, 4096, 4096, 4, 128, "none", bf16, cuda, sm_count=132)["path"] == "mmT"


def test_decode_rule_on_sm90():
    # 1-32 rows: the tile with SCALE_AFTER by stream-K over two programs an SM where the
    # weight is large (s24run1-4), XSUM at 17-32 rows; the GEMV (one row) and mmT (2-32 rows)
    # elsewhere.
    cuda = torch.device("cuda")

    def path(M, N, K, dtype=bf16, act="none", bits=4):
        cfg = Q.choose_path(M, N, K, bits, 128, act, dtype, cuda, sm_count=132,
                            capability=(9, 0))
        return dict(cfg, PDL=None) if cfg["path"] == "wg" else cfg

    def tile(rows, cols, **kw):
        return dict(WG.DECODE_TILES[rows], BLOCK_N=cols, path="wg", SPLIT_K=1, STREAM=264,
                    SCALE_AFTER=True, PDL=None, **kw)

    for act in ("none", "int8", "fp8"):
        # 235M weights: every row count (above 16 rows 16-bit activations only).
        assert path(1, 28672, 8192, act=act) == tile(8, 256)
        assert path(8, 28672, 8192, act=act) == tile(8, 256)
        assert path(9, 28672, 8192, act=act) == tile(16, 256)
        assert path(16, 28672, 8192, act=act) == tile(16, 256)
        # 50M weights: 2-32 rows; 16 rows on 128 columns.
        assert path(1, 12288, 4096, act=act)["path"] == "gemv1p"
        assert path(2, 12288, 4096, act=act) == tile(8, 256)
        assert path(16, 12288, 4096, act=act) == tile(16, 128)
        if act == "none":
            for M, N, K in ((17, 28672, 8192), (32, 28672, 8192), (32, 12288, 4096)):
                assert path(M, N, K) == tile(32, 128, XSUM=True), (M, N, K)
        else:
            # Quantized activations (x permuted by the quantizer, no sums): from 96M weights.
            assert path(17, 28672, 8192, act=act) == tile(32, 128)
            assert path(32, 24576, 4096, act=act) == tile(32, 128)
            assert path(32, 12288, 4096, act=act)["path"] == "mmT"
        assert path(33, 28672, 8192, act=act)["BLOCK_M"] == 64  # the rule of before
    # Fewer columns or weights: as before.
    for M, N, K in ((4, 4096, 14336), (16, 4096, 12288), (4, 6144, 4096), (16, 8192, 4096),
                    (4, 4096, 4096), (32, 4096, 12288)):
        assert path(M, N, K)["path"] == "mmT", (M, N, K)
    assert path(1, 14336, 4096)["path"] == "gemv1p"
    # 6-bit weights: 128 columns (256 spill), to 16 rows.
    assert path(1, 28672, 8192, act="int12", bits=6) == tile(8, 128)
    assert path(4, 12288, 4096, act="int12", bits=6) == tile(8, 128)
    assert path(16, 28672, 8192, act="int12", bits=6) == tile(16, 128)
    assert path(17, 28672, 8192, act="int12", bits=6)["path"] == "mmT"
    assert path(17, 28672, 8192, bits=6)["path"] == "mmT"
    # fp16 x was not measured: the paths of before.
    assert path(4, 28672, 8192, dtype=f16)["path"] == "mmT"
    assert path(1, 28672, 8192, dtype=f16)["path"] == "gemv1p"
    assert WG.choose_decode(16, 28672, 8192, 132, bf16=False) is None


def test_row_split_rule_on_sm90():
    # Just past whole 128-row tiles of wide 4- and 6-bit weights: the whole tiles and the rest
    # as two launches (s40run1-4); 4-bit weights to 16 rest rows in one wave (8 for symmetric
    # weights), by stream-K with bf16 x 64 after one tile of rows and 32 after more, with fp16
    # x 16; 6-bit weights to 16; 8-bit activations alike.
    cuda = torch.device("cuda")

    def path(M, N, K, dtype=bf16, act="none", bits=4, sym=False, **kw):
        return Q.choose_path(M, N, K, bits, 128, act, dtype, cuda, sm_count=132,
                             capability=(9, 0), symmetric=sym, **kw)

    for M, N, K, kw in [(129, 12288, 4096, {}), (144, 12288, 4096, {}),
                        (136, 14336, 4096, dict(sym=True)), (144, 12288, 4096, dict(dtype=f16)),
                        (129, 28672, 8192, {}), (192, 28672, 8192, dict(sym=True)),
                        (257, 28672, 8192, {}), (288, 16384, 8192, {}),
                        (144, 28672, 8192, dict(dtype=f16)), (641, 28672, 8192, dict(dtype=f16)),
                        (144, 12288, 4096, dict(act="fp8")), (192, 28672, 8192, dict(act="int8")),
                        (129, 12288, 4096, dict(bits=6, act="int12")),
                        (144, 28672, 8192, dict(bits=6))]:
        cfg = path(M, N, K, **kw)
        head = M - M % 128
        assert cfg["path"] == "rowsplit" and cfg["HEAD"] == head, (M, N, K, kw, cfg)
        assert cfg["HEAD_PATH"] == path(head, N, K, **kw), (M, N, K, kw)
        assert cfg["HEAD_PATH"]["path"] == "wg"
    assert path(129, 12288, 4096)["HEAD_PATH"]["X_TMA"]  # 128 rows: WIDE_TMA
    assert not path(129, 12288, 4096, sym=True)["HEAD_PATH"].get("X_TMA")
    assert path(257, 28672, 8192)["HEAD_PATH"]["BLOCK_N"] == 256
    # More rest rows, whole tiles, TALL/WIDE weights, 6-bit weights, quantized x, past the
    # tile's rows.
    assert path(161, 12288, 4096) == path(161, 12288, 4096, allow_row_split=False)
    assert path(161, 12288, 4096)["BLOCK_N"] == 256
    for case in [dict(M=193, N=28672, K=8192), dict(M=256, N=28672, K=8192),
                 dict(M=137, N=14336, K=4096, sym=True), dict(M=145, N=28672, K=8192, dtype=f16),
                 dict(M=145, N=12288, K=4096, dtype=f16),
                 dict(M=289, N=28672, K=8192), dict(M=448, N=16384, K=8192),
                 dict(M=128, N=28672, K=8192), dict(M=129, N=4096, K=12288),
                 dict(M=129, N=4096, K=4096), dict(M=145, N=12288, K=4096, bits=6),
                 dict(M=160, N=28672, K=8192, bits=6, act="int12"),
                 dict(M=145, N=14336, K=4096, act="int8"), dict(M=129, N=5120, K=5120, bits=6),
                 dict(M=129, N=12288, K=4096, bits=5, act="int8"),
                 dict(M=129, N=4096, K=12288, act="fp8"),
                 dict(M=257, N=12288, K=4096), dict(M=769, N=28672, K=8192)]:
        assert path(**case)["path"] != "rowsplit", case
    # On 12288 columns those two split after all, at once (test_concurrent_row_split_rule_on_sm90).
    assert path(137, 12288, 4096, sym=True)["CONCURRENT"]
    assert path(145, 12288, 4096, act="int8")["CONCURRENT"]
    cfg = path(129, 12288, 4096, allow_row_split=False)
    assert cfg["path"] == "wg" and cfg["BLOCK_N"] == 256, cfg
    assert WG.row_split_head(129, 12288, 4096, 132) == 128
    assert WG.row_split_head(192, 28672, 8192, 132) == 128
    assert WG.row_split_head(161, 12288, 4096, 132) == 0
    assert WG.row_split_head(140, 12288, 4096, 132, quantized=True) == 128
    assert WG.row_split_head(150, 12288, 4096, 132, quantized=True) == 0
    # Where cublas8 takes the call and K > 8192, the tile rule gives none at 129-192 rows.
    assert WG.row_split_head(129, 28672, 16384, 132, quantized=True, cublas8=True) == 0
    assert WG.row_split_head(136, 12288, 4096, 132, symmetric=True) == 128
    assert WG.row_split_head(137, 12288, 4096, 132, symmetric=True) == 0
    assert WG.row_split_head(160, 28672, 8192, 132, bf16=False) == 0


def test_concurrent_row_split_rule_on_sm90():
    # The split's two launches at once where the 128-row head leaves a quarter of the SMs idle
    # (12288 columns: WIDE_TMA's 96 tiles of 132 SMs) and the rest's 2-32 rows take the decode
    # tiles, capped at two programs an idle SM (s41run6), four to 16 rest rows for symmetric
    # weights or quantized activations (s42run2); quantized activations' 17-32 rest rows on
    # mmT as dispatched (s42run2); 4-bit weights and bf16 x only.
    cuda = torch.device("cuda")

    def path(M, N=12288, K=4096, dtype=bf16, act="none", bits=4, sym=False, **kw):
        return Q.choose_path(M, N, K, bits, 128, act, dtype, cuda, sm_count=132,
                             capability=(9, 0), symmetric=sym, **kw)

    for M, rows in [(130, 8), (136, 8), (144, 16), (145, 32), (160, 32)]:
        cfg = path(M)
        assert cfg["path"] == "rowsplit" and cfg["CONCURRENT"] and cfg["HEAD"] == 128, (M, cfg)
        assert cfg["HEAD_PATH"] == path(128)
        assert cfg["HEAD_PATH"]["X_TMA"] and not cfg["HEAD_PATH"].get("STREAM")
        rest = path(M - 128)
        assert cfg["REST_PATH"] == dict(rest, STREAM=2 * (132 - 96)), (M, cfg)
        assert rest["SCALE_AFTER"] and rest["BLOCK_M"] == rows and rest["STREAM"] == 264
    for form in [dict(sym=True), dict(act="int8"), dict(act="fp8")]:
        for M, per_sm in [(130, 4), (136, 4), (144, 4), (160, 2)]:
            cfg = path(M, **form)
            assert cfg["path"] == "rowsplit" and cfg["CONCURRENT"], (form, M, cfg)
            assert cfg["HEAD_PATH"] == path(128, **form)
            assert not cfg["HEAD_PATH"].get("STREAM") and cfg["HEAD_PATH"]["SPLIT_K"] == 1
            rest = path(M - 128, **form)
            if rest["path"] == "mmT":
                # 32 rows of quantized activations: off the decode tiles, launched as they are
                assert form.get("act") and M == 160 and cfg["REST_PATH"] == rest, (form, cfg)
            else:
                assert cfg["REST_PATH"] == dict(rest, STREAM=per_sm * 36), (form, M, cfg)
    assert WG.rest_beside_head(136, 12288, 4096, 132) == 72
    assert WG.rest_beside_head(136, 12288, 4096, 132, symmetric=True) == 144
    assert WG.rest_beside_head(152, 12288, 4096, 132, quantized=True) == 0
    # Below the decode tiles' weights (12288 x 2048) the mmT rest was not measured.
    assert WG.rest_beside_head(136, 12288, 2048, 132, quantized=True) is None
    assert WG.rest_beside_head(152, 12288, 2048, 132, quantized=True) is None
    assert not path(136, K=2048, act="int8").get("CONCURRENT")
    assert WG.rest_beside_head(136, 12416, 4096, 132) == 2 * (132 - 97)
    assert WG.rest_beside_head(136, 12800, 4096, 132) is None  # 32 idle SMs: under a quarter
    # One rest row (gemv1p: no grid to cap), 33+ rows (the 64-row tile), 20 idle SMs (14336
    # columns), stream-K heads (28672 columns), and the forms not measured: the split in one
    # stream, or none.
    assert not path(129).get("CONCURRENT") and path(129)["path"] == "rowsplit"
    for case in [dict(M=161), dict(M=136, N=14336), dict(M=144, N=28672, K=8192),
                 dict(M=136, dtype=f16), dict(M=129, sym=True), dict(M=129, act="int8"),
                 dict(M=161, act="fp8"), dict(M=136, bits=6), dict(M=136, N=4096, K=12288),
                 dict(M=136, allow_row_split=False)]:
        assert not path(**case).get("CONCURRENT"), case
    assert WG.rest_beside_head(136, 14336, 4096, 132) is None


def test_codes_dispatch_rule_on_sm90():
    # q3n::qlinear_codes: mmT reads the codes at up to CODES_MAX_ROWS rows (where the op takes
    # the wg tiles), and the row split only to CODES_ROW_SPLIT_REST rows past the tiles (the
    # op's rule splits 160 rows of 28672 x 8192; on codes that lost, s41run1).
    def path(M, N, K, act="fp8", codes=True, **kw):
        choose = Q.choose_codes_path if codes else Q.choose_path
        return choose(M, N, K, 4, 128, act, bf16, torch.device("cuda"), sm_count=132,
                      capability=(9, 0), **kw)

    assert Q.CODES_ROW_SPLIT_REST == 16
    for M, N, K, act in [(144, 28672, 8192, "fp8"), (129, 12288, 4096, "int8"),
                         (136, 12288, 4096, "int12")]:
        cfg = path(M, N, K, act)
        assert cfg["path"] == "rowsplit" and cfg["HEAD"] == 128, (M, N, K, act, cfg)
    assert path(160, 28672, 8192, codes=False)["path"] == "rowsplit"
    cfg = path(160, 28672, 8192)
    assert cfg == path(160, 28672, 8192, allow_row_split=False) and cfg["path"] == "wg", cfg
    assert path(137, 12288, 4096, symmetric=True)["path"] != "rowsplit"
    # The op's concurrent split where its rest takes the decode tile, for zero points and
    # per-token codes (s42run5); else (symmetric weights, codes per 128 channels, the op's mmT
    # rest at 17-32 rows) the codes split in one stream with the rest dispatched, or not.
    for M, act in [(130, "int8"), (144, "fp8")]:
        cfg = path(M, 12288, 4096, act)
        assert cfg == path(M, 12288, 4096, act, codes=False) and cfg["CONCURRENT"], cfg
        assert cfg["REST_PATH"]["STREAM"] == 4 * 36, cfg
    for M, act, sym, ag, split in [(136, "fp8", True, Q.PER_TOKEN, True),
                                   (144, "int8", True, Q.PER_TOKEN, False),
                                   (136, "int8", False, 128, True),
                                   (160, "int8", False, Q.PER_TOKEN, False)]:
        assert path(M, 12288, 4096, act, codes=False, symmetric=sym,
                    act_group_size=ag)["CONCURRENT"]
        cfg = path(M, 12288, 4096, act, symmetric=sym, act_group_size=ag)
        assert not cfg.get("CONCURRENT") and "REST_PATH" not in cfg, (M, act, sym, cfg)
        assert (cfg["path"] == "rowsplit") == split, (M, act, sym, cfg)
    for M in (16, 48):
        assert path(M, 12288, 4096)["path"] == "mmT"
        assert path(M, 12288, 4096, codes=False)["path"] == "wg"


def test_forced_wg_path_refuses_the_interpreter():
    gen = _gen("wginterp")
    pw = _packed(gen, 64, 128, 4, 128, False)
    x = torch.randn(3, 128, generator=gen).to(bf16)
    with pytest.raises(ValueError, match="wg path .* sm_90 GPU only"):
        Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 128, 128, "none",
                  interpreter=True, path=dict(WG.SMALL, path="wg", SPLIT_K=1))


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,dtype,sym,bias,bits,act", [
    (129, 12288, 4096, bf16, False, False, 4, "none"),
    (144, 12288, 4096, bf16, False, True, 4, "none"),
    (136, 12288, 4096, f16, True, True, 4, "none"),
    (129, 14336, 4096, bf16, True, True, 4, "none"),
    (130, 28672, 8192, bf16, False, True, 4, "none"),
    (191, 28672, 8192, bf16, True, False, 4, "none"),
    (263, 28672, 8192, bf16, False, True, 4, "none"),
    (144, 28672, 8192, f16, False, False, 4, "none"),
    (257, 16384, 8192, f16, True, True, 4, "none"),
    (136, 12288, 4096, bf16, False, True, 4, "fp8"),
    (190, 28672, 8192, bf16, False, False, 4, "int8"),
    (129, 12288, 4096, bf16, False, True, 6, "int12"),
    (144, 28672, 8192, f16, True, False, 6, "none")])
def test_gpu_dispatched_row_split_against_float64(M, N, K, dtype, sym, bias, bits, act):
    # As dispatched: the whole tiles written by the wg kernel into the output's first rows,
    # the rest on the small-M paths.
    cfg = Q.choose_path(M, N, K, bits, 128, act, dtype, torch.device("cuda"), symmetric=sym)
    assert cfg["path"] == "rowsplit" and cfg["HEAD"] == M - M % 128, cfg
    gen = _gen(f"wgrowsplit{M}{N}{K}{dtype}{sym}{bias}{bits}{act}")
    pw = _packed(gen, N, K, bits, 128, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(dtype).cuda()
    b = torch.randn(N, generator=gen).to(dtype).cuda() if bias else None
    out = check_against_float64(x, pw, b, act=act)
    one = Q._launch(x, pw.qweight, pw.scales, pw.zeros, b, None, bits, 128, K, act,
                    interpreter=False,
                    path=Q.choose_path(M, N, K, bits, 128, act, dtype, x.device, symmetric=sym,
                                       allow_row_split=False))
    # Same function as the one launch, up to its summation order and 16-bit rounding.
    assert (out.float() - one.float()).abs().max() <= TOL[dtype] * one.float().abs().max()


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("bits,act", [(4, "int8"), (4, "fp8"), (6, "int12"), (6, "none")])
@pytest.mark.parametrize("M,N,K", [(131, 12288, 4096), (200, 28672, 8192)])
def test_gpu_forced_row_split_of_other_formats_against_float64(bits, act, M, N, K):
    # The split forced for 6-bit weights and quantized activations: the head's activations
    # quantized, dequantised and permuted for the wg tile, written into the output's rows.
    assert Q.choose_path(128, N, K, bits, 128, act, bf16, torch.device("cuda"))["path"] == "wg"
    gen = _gen(f"wgrowsplitfmt{bits}{act}{M}{N}{K}")
    pw = _packed(gen, N, K, bits, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    b = torch.randn(N, generator=gen).to(bf16).cuda()
    check_against_float64(x, pw, b, act=act, path=dict(path="rowsplit", HEAD=128))


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,sym,bits,act,ag", [
    (129, 12288, 4096, False, 4, "int8", Q.PER_TOKEN), (136, 12288, 4096, True, 4, "fp8", 128),
    (144, 28672, 8192, False, 4, "fp8", Q.PER_TOKEN),
    (144, 28672, 8192, False, 6, "int12", Q.PER_TOKEN),
    (130, 12288, 4096, False, 4, "int8", Q.PER_TOKEN), (144, 12288, 4096, False, 4, "fp8",
                                                        Q.PER_TOKEN)])
def test_gpu_qlinear_codes_dispatched_row_split_against_float64(M, N, K, sym, bits, act, ag):
    # q3n::qlinear_codes (a fused norm's sibling linears) splits as the op does: the codes'
    # whole tiles of rows on the wg tile straight into y, the rest's codes on the small-M paths
    # (at 130 / 144 rows of 12288 x 4096 beside the head on a second stream: bit-equal to the
    # same split in one stream).
    dev = torch.device("cuda")
    cfg = Q.choose_codes_path(M, N, K, bits, 128, act, bf16, dev, act_group_size=ag,
                              symmetric=sym)
    assert cfg["path"] == "rowsplit" and cfg["HEAD"] == M - M % 128, cfg
    gen = _gen(f"codesrowsplit{M}{N}{K}{sym}{bits}{act}{ag}")
    pw = _packed(gen, N, K, bits, 128, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    b = torch.randn(N, generator=gen).to(bf16).cuda()
    codes, xs = Q.quantize_activations_triton(x, act, None, False, ag)
    w = (pw.qweight, pw.scales, pw.zeros, b, bits, 128, K, act)
    got = torch.ops.q3n.qlinear_codes(codes, xs, *w, bf16, ag)
    exact = Q.reference_codes(codes, xs, *w, torch.float64, ag)
    scale = exact.abs().max().item()
    err = (got.double() - exact).abs().max().item()
    assert err <= TOL[bf16] * scale, f"max err {err:.3g} > {TOL[bf16]:.1g} * {scale:.3g}"
    one = Q._qlinear_codes_launch(codes, xs, *w, bf16, interpreter=False, act_group_size=ag,
                                  path=Q.choose_codes_path(M, N, K, bits, 128, act, bf16, dev,
                                                           act_group_size=ag, symmetric=sym,
                                                           allow_row_split=False))
    assert (got.float() - one.float()).abs().max() <= TOL[bf16] * one.float().abs().max()
    assert bool(cfg.get("CONCURRENT")) == (N == 12288 and M in (130, 144)), cfg
    if cfg.get("CONCURRENT"):
        one_stream = Q._qlinear_codes_launch(codes, xs, *w, bf16, interpreter=False,
                                             act_group_size=ag, path=dict(cfg, CONCURRENT=False))
        assert torch.equal(got, one_stream)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,bias,sym,act", [(130, False, False, "none"), (136, True, False, "none"),
                                            (144, False, False, "none"), (160, True, False, "none"),
                                            (136, True, True, "none"), (150, False, True, "none"),
                                            (144, True, False, "int8"), (160, False, False, "int8"),
                                            (136, False, False, "fp8"), (152, True, True, "fp8")])
def test_gpu_concurrent_row_split_against_float64(M, bias, sym, act):
    # As dispatched on 12288 x 4096: the 128-row head on the wg tile and the rest's 2-32 rows
    # on the decode tile (quantized activations' 17-32 on mmT) on a second stream at once; the
    # same rows as the split in one stream, bit for bit (same kernels, same launches), and the
    # one launch's function.
    dev = torch.device("cuda")
    cfg = Q.choose_path(M, 12288, 4096, 4, 128, act, bf16, dev, symmetric=sym)
    assert cfg["path"] == "rowsplit" and cfg.get("CONCURRENT"), cfg
    gen = _gen(f"wgconcurrent{M}{bias}{sym}{act}")
    pw = _packed(gen, 12288, 4096, 4, 128, sym, device="cuda")
    x = torch.randn(M, 4096, generator=gen).to(bf16).cuda()
    b = torch.randn(12288, generator=gen).to(bf16).cuda() if bias else None
    out = check_against_float64(x, pw, b, act=act)
    args = (x, pw.qweight, pw.scales, pw.zeros, b, None, 4, 128, 4096, act)
    one_stream = Q._launch(*args, interpreter=False, path=dict(cfg, CONCURRENT=False))
    assert torch.equal(out, one_stream)
    one = Q._launch(*args, interpreter=False,
                    path=Q.choose_path(M, 12288, 4096, 4, 128, act, bf16, dev, symmetric=sym,
                                       allow_row_split=False))
    assert (out.float() - one.float()).abs().max() <= TOL[bf16] * one.float().abs().max()


@needs_hopper
@pytest.mark.gpu
def test_gpu_concurrent_row_split_in_a_cuda_graph_chain():
    # The concurrent split's output feeding the next linear inside a captured CUDA graph (the
    # side stream's branch joined before it), replayed with new x: against float64 and equal
    # to the eager calls.
    gen = _gen("wgconcurrentchain")
    pws = [_packed(gen, 12288, 4096, 4, 128, False, device="cuda"),
           _packed(gen, 4096, 12288, 4, 128, False, device="cuda")]
    assert Q.choose_path(144, 12288, 4096, 4, 128, "none", bf16,
                         torch.device("cuda")).get("CONCURRENT")
    x = torch.randn(144, 4096, generator=gen).to(bf16).cuda()
    _replay_with_new_x(*_w4a16_chain(pws, lambda pw, a: None), x, gen, eager_equal=True)


@needs_cuda
@pytest.mark.gpu
def test_gpu_concurrent_row_split_refuses_a_head_with_tickets():
    pw = _packed(_gen("wgconcurrentbad"), 256, 256, 4, 128, False, device="cuda")
    x = torch.randn(130, 256).to(bf16).cuda()
    head = dict(WG.WIDE, path="wg", SPLIT_K=1, STREAM=132)
    with pytest.raises(ValueError, match="concurrent row split needs a head launch without a K "
                                         "split or stream-K"):
        Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 128, 256, "none",
                  interpreter=False,
                  path=dict(path="rowsplit", HEAD=128, CONCURRENT=True, HEAD_PATH=head))


def test_wg_out_must_be_rows_of_y():
    pw = _packed(_gen("wgout"), 64, 128, 4, 128, False)
    x = torch.randn(3, 128).to(bf16)
    with pytest.raises(ValueError, match=r"out must be \[3, 64\] torch.bfloat16"):
        WG._launch_tiles(x, x, None, pw.qweight, pw.scales, pw.zeros, None, 128,
                         dict(WG.SMALL, SPLIT_K=1), None, False, 4, False, bf16,
                         out=torch.empty(3, 64, dtype=f16))


# N a multiple of 16 but not of the tiles' 64/128 columns; K of 1-32 blocks, splits uneven and
# empty (512 in 3: the last split has no block).
_GPU_SHAPES = [(49, 208, 384, 1, False), (65, 1008, 1280, 1, True), (128, 4096, 1024, 1, False),
               (100, 144, 512, 3, True), (200, 528, 896, 2, False), (256, 1024, 4096, 4, True),
               (7, 80, 128, 1, True)]
_GPU_TILES = pytest.mark.parametrize(
    "tile", [WG.SMALL, WG.WIDE, WG.TALL], ids=["64x64", "128x128", "128x64"])


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, f16])
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES)
@_GPU_TILES
@pytest.mark.parametrize("sym", [False, True])
def test_gpu_wg_against_float64(dtype, M, N, K, split, bias, tile, sym):
    _check_wg(4, dtype, M, N, K, split, bias, tile, sym)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,sym", [(bf16, False), (f16, True)])
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES)
@_GPU_TILES
def test_gpu_wg6_against_float64(dtype, sym, M, N, K, split, bias, tile):
    _check_wg(6, dtype, M, N, K, split, bias, tile, sym)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("bits,dtype,sym", [(4, bf16, False), (6, f16, True)])
@pytest.mark.parametrize("M,N,K,bias", [(s[0], s[1], s[2], s[4]) for s in _GPU_SHAPES])
@pytest.mark.parametrize("tile", [WG.SMALL, WG.WIDE], ids=["64x64", "128x128"])
@pytest.mark.parametrize("programs", [5, 132])
def test_gpu_wg_stream_k_against_float64(bits, dtype, sym, M, N, K, bias, tile, programs):
    # Stream-K: ranges of (tile, K block) units that start and end inside tiles, tiles summed
    # from 2 or more pieces, and (132 programs on small shapes) more programs than units.
    _check_wg(bits, dtype, M, N, K, 1, bias, tile, sym, stream=programs)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,sym", [(bf16, False), (f16, True)])
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES)
@pytest.mark.parametrize("stream", [0, 132])
@pytest.mark.parametrize("tile", [WG.WIDE256, WG.SIXTY_FOUR256], ids=["128x256", "64x256"])
def test_gpu_wg256_against_float64(dtype, sym, M, N, K, split, bias, stream, tile):
    # 256-column tiles: each warpgroup two MMAs of 64 weight columns a sub-tile (4-bit only).
    _check_wg(4, dtype, M, N, K, 1 if stream else split, bias, tile, sym, stream=stream)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,bias", [(300, 1040, 1024, True), (520, 512, 2048, False),
                                        (768, 784, 1152, True)])
@pytest.mark.parametrize("tile", [WG.WIDE256, WG.WIDE], ids=["128x256", "128x128"])
def test_gpu_wg_above_256_rows_against_float64(M, N, K, bias, tile):
    # The rows the dispatch gives large 4-bit weights since session 28 (to 768), by stream-K
    # over the SMs and on plain tiles, M off the 128-row tile.
    _check_wg(4, bf16, M, N, K, 1, bias, tile, False, stream=132)
    _check_wg(4, bf16, M, N, K, 1, bias, tile, True)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES)
@pytest.mark.parametrize("lookahead,stages", [(3, 4), (2, 3)])
@pytest.mark.parametrize("stream", [0, 132])
def test_gpu_wg_lookahead_and_stages_against_float64(M, N, K, split, bias, lookahead, stages,
                                                     stream):
    # Three MMA groups left in flight; three stages (one block ahead).
    tile = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, STAGES=stages, LOOKAHEAD=lookahead)
    _check_wg(4, bf16, M, N, K, 1 if stream else split, bias, tile, False, stream=stream)


def _check_wg(bits, dtype, M, N, K, split, bias, tile, sym, stream=0):
    gen = _gen(f"wg{bits}{dtype}{M}{N}{K}{split}{bias}{tile['BLOCK_M']}{tile['BLOCK_N']}{sym}"
               f"{stream}{tile.get('LOOKAHEAD', 1)}{tile['STAGES']}")
    pw = _packed(gen, N, K, bits, 128, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(dtype).cuda()
    b = torch.randn(N, generator=gen).to(dtype).cuda() if bias else None
    cfg = dict(tile, path="wg", SPLIT_K=split)
    if stream:
        cfg["STREAM"] = stream
    check_against_float64(x, pw, b, path=cfg)
    check_against_float64(x, pw, b, path=cfg)  # again: every ticket was reset
    assert int(Q._tickets(x.device, 1).abs().sum()) == 0


_DECODE_SHAPES = [(1, 256, 512, True), (3, 1008, 1280, False), (8, 4096, 1024, True),
                  (13, 528, 896, False), (16, 2048, 4096, True), (29, 144, 384, False)]


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("bits,dtype,sym,xsum,M,N,K,bias", [
    (bits, dtype, sym, xsum, *shape)
    for bits, dtype, sym, xsum in ((4, bf16, False, True), (4, bf16, True, True),
                                   (4, bf16, False, False), (4, f16, True, False),
                                   (6, bf16, False, True), (6, f16, False, False))
    for shape in _DECODE_SHAPES if bits == 4 or shape[0] <= 16])  # 6-bit: to 16 rows
@pytest.mark.parametrize("stream", [0, 5, 264])
def test_gpu_wg_decode_scale_after_against_float64(bits, dtype, sym, xsum, M, N, K, bias,
                                                   stream):
    # The decode tiles (x's rows 8, 16 or 32 on the MMA's N side) with SCALE_AFTER: each K
    # block's sum of (q - z) x scaled in fp32 (XSUM: of (M + q) x, less (M + z) times x's
    # block sum); stream-K with pieces inside tiles and more programs than units (264), and
    # (stream 0) K split 2 by tickets. 4-bit weights on 256 columns at 8 and 16 rows of every
    # other shape, 128 elsewhere (6-bit: 128, to 16 rows, as dispatched).
    cols = 256 if bits == 4 and M <= 16 and _DECODE_SHAPES.index((M, N, K, bias)) % 2 else 128
    tile = dict(WG.DECODE_TILES[8 if M <= 8 else 16 if M <= 16 else 32], BLOCK_N=cols,
                SCALE_AFTER=True, XSUM=xsum)
    _check_wg(bits, dtype, M, N, K, 1 if stream else 2, bias, tile, sym, stream=stream)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("mean", [4.0, -300.0])
def test_gpu_wg_xsum_with_a_large_mean_against_float64(mean):
    # x far from zero relative to its spread: XSUM's two block sums (of (M + q) x and of
    # (M + z) x) then cancel most; the result must still meet float64's tolerance.
    gen = _gen(f"wgxsummean{mean}")
    pw = _packed(gen, 2048, 4096, 4, 128, False, device="cuda")
    x = (mean + 0.01 * abs(mean) * torch.randn(16, 4096, generator=gen)).to(bf16).cuda()
    tile = dict(WG.DECODE_TILES[16], SCALE_AFTER=True, XSUM=True, path="wg", SPLIT_K=1,
                STREAM=264)
    check_against_float64(x, pw, path=tile)


@needs_hopper
@pytest.mark.gpu
def test_gpu_wg_xsum_takes_bf16_x_it_permutes():
    gen = _gen("wgxsum")
    pw = _packed(gen, 256, 512, 4, 128, False, device="cuda")
    tile = dict(WG.DECODE_TILES[8], BLOCK_N=128, SCALE_AFTER=True, XSUM=True, path="wg",
                SPLIT_K=1)
    with pytest.raises(ValueError, match="XSUM takes bf16 x"):
        check_against_float64(torch.randn(4, 512, generator=gen).to(f16).cuda(), pw, path=tile)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,act,bits", [
    (1, 24576, 4096, "none", 4), (4, 12288, 4096, "fp8", 4), (16, 12288, 4096, "int12", 6),
    (24, 12288, 4096, "none", 4), (24, 24576, 4096, "int8", 4)])
def test_gpu_dispatched_decode_tile_against_float64(M, N, K, act, bits):
    # As dispatched (the op's own call: x permuted, or quantised, dequantised and permuted, by
    # one kernel first).
    cfg = Q.choose_path(M, N, K, bits, 128, act, bf16, torch.device("cuda"))
    assert cfg["path"] == "wg" and cfg["SCALE_AFTER"] and cfg["BLOCK_M"] == (
        8 if M <= 8 else 16 if M <= 16 else 32) and cfg.get("XSUM", False) == (
            M > 16 and act == "none"), cfg
    gen = _gen(f"wgdecode{M}{N}{K}{act}{bits}")
    pw = _packed(gen, N, K, bits, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    check_against_float64(x, pw, None, act=act)



@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("act", ["fp8", "int8"])
def test_gpu_dispatched_long_k_with_quantized_activations_against_float64(act):
    # 193-256 rows of K > 8192 with 8-bit activations: the tile again, not cublas8 (s25run3).
    M, N, K = 200, 4096, 12288
    cfg = Q.choose_path(M, N, K, 4, 128, act, bf16, torch.device("cuda"))
    assert cfg["path"] == "wg" and cfg["SPLIT_K"] == 2, cfg
    gen = _gen(f"wglongk{act}")
    pw = _packed(gen, N, K, 4, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    check_against_float64(x, pw, None, act=act)

@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,tile,split,stream", [
    (40, 4096, 4096, WG.SMALL, 4, 0), (200, 12288, 4096, WG.WIDE256, 1, 0),
    (256, 4096, 1024, WG.TALL, 1, 0), (96, 8192, 2048, WG.WIDE, 1, 132),
    (129, 4096, 1024, WG.TALL_TMA, 1, 0), (96, 4096, 1024, WG.TALL_TMA, 2, 0),
    (96, 12288, 1024, WG.WIDE_TMA, 1, 0)])
def test_gpu_wg_pdl_chain_in_a_cuda_graph_reads_this_replays_x(M, N, K, tile, split, stream):
    # Launched with PDL, the wg kernel starts before x's permutation has finished and must
    # wait for it before reading x: replayed after x changes, a read of the permuted buffer
    # of the replay before would give the old product. Two linears in a row, the second's x
    # the first's output (each its own PDL chain), replayed with new inputs each time.
    gen = _gen(f"wgpdl{M}{N}{K}{stream}")
    pws = [_packed(gen, N, K, 4, 128, False, device="cuda"),
           _packed(gen, K, N, 4, 128, False, device="cuda")]
    cfg = dict(tile, path="wg", SPLIT_K=split, **({"STREAM": stream} if stream else {}))
    assert cfg.get("PDL", True)
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()

    _replay_with_new_x(*_w4a16_chain(pws, lambda pw, a: cfg), x, gen, eager_equal=False)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,act", [(200, 12288, 1024, "fp8"), (96, 4096, 2048, "int8"),
                                       (136, 12288, 4096, "fp8"), (256, 4096, 4096, "int8")])
def test_gpu_codes_wg_pdl_chain_in_a_cuda_graph_reads_this_replays_codes(M, N, K, act):
    # q3n::qlinear_codes on the wg path launches the codes' dequantisation and the tile after it
    # with PDL (CODES_WG_PDL): the tile starts before the dequantisation has finished and must
    # wait for it. Two linears in a row, each fed codes that the activations' quantizer makes
    # in the graph from the output before; replayed after x changes, each replay must equal the
    # chain called eagerly (a read of the previous replay's activations would not), and the
    # first linear must match float64 on its codes.
    assert Q.CODES_WG_PDL
    dev = torch.device("cuda")
    path = Q.choose_codes_path(M, N, K, 4, 128, act, bf16, dev)
    assert path["path"] == "wg" or path.get("HEAD_PATH", {}).get("path") == "wg", path
    gen = _gen(f"codespdl{M}{N}{K}{act}")
    pws = [_packed(gen, N, K, 4, 128, False, device="cuda"),
           _packed(gen, K, N, 4, 128, False, device="cuda")]
    firsts = []

    def chain(a):
        for i, pw in enumerate(pws):
            codes, xs = Q.quantize_activations_triton(a, act, None, False)
            if i == 0:
                firsts.append((codes, xs))
            a = torch.ops.q3n.qlinear_codes(codes, xs, pw.qweight, pw.scales, pw.zeros, None,
                                            4, 128, pw.in_features, act, bf16) * 0.05
            if i == 0:
                firsts.append(a)
        return a

    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    chain(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    (codes, xs), first = firsts[-2:]
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen).to(bf16).cuda())
        graph.replay()
        torch.cuda.synchronize()
        got_first = first.clone()
        exact = Q.reference_codes(codes, xs, pws[0].qweight, pws[0].scales, pws[0].zeros, None,
                                  4, 128, K, act, torch.float64) * 0.05
        err = (got_first.double() - exact).abs().max().item()
        assert err <= TOL[bf16] * exact.abs().max().item(), err
        assert torch.equal(out, chain(x))


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,bits,act,want", [
    (200, 5120, 1024, 4, "none", "stream"), (129, 6016, 2048, 6, "int12", "stream"),
    (96, 5120, 1024, 4, "none", "stream"), (256, 4096, 8320, 4, "none", "tall_tma"),
    (160, 4096, 8320, 6, "none", "tall_tma"), (160, 4096, 8320, 6, "int12", "split2")])
def test_gpu_dispatched_wide_for_tall_grids_against_float64(M, N, K, bits, act, want):
    # Session 22's rule for 3040-6016 columns: WIDE by stream-K past a wave of TALL programs,
    # WIDE with K split 2 for K above 8192 at 129-256 rows (since session 37-38 for symmetric
    # weights and quantized x only: weights with zero points and 16-bit x take TALL_TMA); the
    # op as dispatched.
    gen = _gen(f"wgtallgrid{M}{N}{K}{bits}{act}")
    pw = _packed(gen, N, K, bits, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    path = Q.choose_path(M, N, K, bits, 128, act, bf16, x.device)
    if want == "tall_tma":
        assert path == dict(WG.TALL_TMA, path="wg", SPLIT_K=1, PDL=True), path
        check_against_float64(x, pw, act=act)
        return
    assert path["BLOCK_N"] == 128 and path["BLOCK_M"] == 128, path
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert (path.get("STREAM"), path["SPLIT_K"]) == ((sms, 1) if want == "stream" else (None, 2))
    check_against_float64(x, pw, act=act)
    check_against_float64(x, pw, act=act)  # again: every ticket was reset


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 6])
def test_gpu_wg_unpack_is_the_emulated_pairs(bits):
    # One row of x as a one-hot selector per K position reads the weight operand back exactly
    # (fp32 accumulation of one product): W'[n, k] = y[k, n] for x = I.
    gen = _gen(f"wgpairs{bits}")
    N, K = 128, 256
    pw = _packed(gen, N, K, bits, 128, False, device="cuda")
    for dtype in (bf16, f16):
        eye = torch.eye(K, dtype=dtype, device="cuda")[:128]  # rows 0..127: channels 0..127
        y = Q._launch(eye, pw.qweight, pw.scales, pw.zeros, None, None, bits, 128, K, "none",
                      interpreter=False, path=dict(path="wg", BLOCK_M=128, BLOCK_N=128,
                                                   num_warps=8, STAGES=4, SPLIT_K=1))
        codes = Q.P.unpack_codes(pw.qweight, bits, K)[:, :128]  # [N, 128]
        want = (codes.float() - pw.zeros[0].float()[:, None]).to(dtype).float() * \
            pw.scales[0].to(dtype).float()[:, None]
        assert torch.equal(y.t().float(), want.to(dtype).float())


@needs_hopper
@pytest.mark.gpu
def test_gpu_dispatch_takes_wg_from_33_rows():
    dev = torch.device("cuda")
    for M in (33, 48, 49, 65, 128, 200, 256):
        assert Q.choose_path(M, 4096, 4096, 4, 128, "none", bf16, dev)["path"] == "wg"
    assert Q.choose_path(32, 4096, 4096, 4, 128, "none", bf16, dev)["path"] == "mmT"
    assert Q.choose_path(257, 4096, 4096, 4, 128, "none", bf16, dev)["path"] != "wg"
    assert Q.choose_path(128, 4096, 4096, 4, 128, "none", torch.float32, dev)["path"] != "wg"
    gen = _gen("wgdispatch")
    pw = _packed(gen, 4096, 512, 4, 128, False, device="cuda")
    for M in (100, 40):
        x = torch.randn(M, 512, generator=gen).to(bf16).cuda()
        check_against_float64(x, pw)
    # Few columns with quantized activations at 129-256 rows: 64 x 64 tiles, K split 2.
    few = _packed(gen, 1024, 512, 6, 128, False, device="cuda")
    x = torch.randn(200, 512, generator=gen).to(bf16).cuda()
    for act in ("int12", "fp8"):
        # 128 programs of a tile that fits two an SM: plain stream order where that is more
        # than half and at most one an SM (s22run2).
        path = Q.choose_path(200, 1024, 512, 6, 128, act, bf16, dev)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert path.pop("PDL") == (not sms < 2 * 128 <= 2 * sms)
        assert path == dict(WG.SMALL, path="wg", SPLIT_K=2)
        check_against_float64(x, few, act=act)
    with pytest.raises(ValueError, match="multiple of 16 output features"):
        pw = _packed(gen, 4100, 512, 4, 128, False, device="cuda")
        Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 128, 512, "none",
                  interpreter=False, path=dict(WG.SMALL, path="wg", SPLIT_K=1))


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("act", ["fp8", "int8", "int12"])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 128])
@pytest.mark.parametrize("bits", [4, 6])
def test_gpu_wg_with_quantized_activations_against_float64(act, ag, bits):
    # Quantised activations reach the tile dequantised to x's dtype and permuted per 128
    # channels (the op from x, and q3n::qlinear_codes from the codes a fused norm writes).
    gen = _gen(f"wgact{act}{ag}{bits}")
    M, N, K = 100, 1008, 1280
    pw = _packed(gen, N, K, bits, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    cfg = dict(WG.TALL, path="wg", SPLIT_K=2)
    check_against_float64(x, pw, None, act=act, path=cfg, ag=ag)
    codes, xs = Q.quantize_activations(x, act, None, ag)
    codes = codes.to(Q._act_codes_dtype(act, x.device, False))
    got = Q._qlinear_codes_launch(codes, xs, pw.qweight, pw.scales, pw.zeros, None, bits, 128,
                                  K, act, bf16, interpreter=False, path=cfg, act_group_size=ag)
    want = Q.reference_codes(codes, xs, pw.qweight, pw.scales, pw.zeros, None, bits, 128, K,
                             act, torch.float64, ag)
    err = (got.double() - want).abs().max().item()
    assert err <= 2e-2 * want.abs().max().item(), err


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("act", ["fp8", "int8"])
def test_gpu_dispatched_wide256_with_8_bit_activations_against_float64(act):
    # 200 rows of a 12288-column weight with 8-bit activations: WIDE256 as dispatched (for fp8
    # codes ahead of cublas8, K <= 8192), the op from x against float64.
    gen = _gen(f"wg256act{act}")
    M, N, K = 200, 12288, 1024
    pw = _packed(gen, N, K, 4, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    path = Q.choose_path(M, N, K, 4, 128, act, bf16, x.device)
    assert path == dict(WG.WIDE256, path="wg", SPLIT_K=1, PDL=True), path
    check_against_float64(x, pw, None, act=act)


@needs_hopper
@pytest.mark.gpu
def test_gpu_codes_op_keeps_mmT_reading_codes_to_64_rows(monkeypatch):
    # q3n::qlinear_codes (a fused norm's sibling linears): mmT reads the codes themselves up to
    # 64 rows; the wg path (codes dequantised first) from 65.
    gen = _gen("wgcodes")
    N, K = 4096, 1024
    pw = _packed(gen, N, K, 4, 128, False, device="cuda")
    calls = []
    real = WG.run
    monkeypatch.setattr(WG, "run", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    for M in (64, 100):
        x = torch.randn(M, K, generator=gen).to(bf16).cuda()
        codes, xs = Q.quantize_activations(x, "fp8", None)
        codes = codes.to(torch.float8_e4m3fn)
        got = Q._qlinear_codes_launch(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 128,
                                      K, "fp8", bf16, interpreter=False)
        want = Q.reference_codes(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 128, K,
                                 "fp8", torch.float64)
        assert (got.double() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    assert calls == [100]
    assert Q.choose_path(100, N, K, 4, 128, "fp8", bf16, torch.device("cuda"),
                         allow_wg=False)["path"] != "wg"


def _check_wg_fp8(M, N, K, split, bias, tile, sym, stream=0, mean=0.0):
    """The fp8 form (run_fp8) on the op's own fp8 codes of bf16 x against float64 of the same
    codes: (c * s_x) @ ((q - z) * s)^T (+ bias), to the bf16 tolerance of the result's largest
    magnitude; twice (every ticket reset)."""
    gen = _gen(f"wgfp8{M}{N}{K}{split}{bias}{tile['BLOCK_M']}{tile['BLOCK_N']}{sym}{stream}"
               f"{mean}")
    pw = _packed(gen, N, K, 4, 128, sym, device="cuda")
    x = (torch.randn(M, K, generator=gen) + mean).to(bf16).cuda()
    b = torch.randn(N, generator=gen).to(bf16).cuda() if bias else None
    codes, xs = Q.quantize_activations_triton(x, "fp8", None, False)
    assert codes.dtype == torch.float8_e4m3fn
    xk, sums = WG.fp8_block_order(codes)
    w = Q.dequantize_triton(pw.qweight, pw.scales, pw.zeros, 4, 128, K, torch.float32)
    exact = (codes.double() * xs.double()[:, None]) @ w.double().t()
    if bias:
        exact += b.double()
    cfg = dict(tile, SPLIT_K=split, **({"STREAM": stream} if stream else {}))
    for _ in range(2):
        out = WG.run_fp8(xk, sums, xs, pw.qweight, pw.scales, pw.zeros, b, K, cfg, Q._tickets)
        assert out.shape == (M, N) and out.dtype == bf16
        err = (out.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= TOL[bf16] * scale, f"max err {err:.3g} > {TOL[bf16]:.1g} * {scale:.3g}"
    assert int(Q._tickets(x.device, 1).abs().sum()) == 0


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES)
@_GPU_TILES
@pytest.mark.parametrize("sym", [False, True])
def test_gpu_wg_fp8_against_float64(M, N, K, split, bias, tile, sym):
    _check_wg_fp8(M, N, K, split, bias, tile, sym)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,bias", [(s[0], s[1], s[2], s[4]) for s in _GPU_SHAPES[:4]])
@pytest.mark.parametrize("tile", [WG.SMALL, WG.WIDE], ids=["64x64", "128x128"])
@pytest.mark.parametrize("programs", [5, 132])
def test_gpu_wg_fp8_stream_k_against_float64(M, N, K, bias, tile, programs):
    _check_wg_fp8(M, N, K, 1, bias, tile, False, stream=programs)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("mean", [4.0, -300.0])
def test_gpu_wg_fp8_zero_points_with_a_large_mean_against_float64(mean):
    # z times the block's sum of codes comes off sum q c in fp32: x far from zero mean makes
    # both large (codes near 448 in every channel).
    _check_wg_fp8(200, 1024, 2048, 1, True, WG.TALL, False, mean=mean)


# X_TMA: x's stages filled by TMA copies (one thread a block, rows past M zero-filled by the
# copy), the barriers initialised and invalidated per call of the tile's pipeline (stream-K
# calls it once a piece).
# (tile, K split as the shape gives it or none, stream-K programs)
_TMA_TILES = [(WG.TALL, False, 0), (WG.SMALL, True, 0), (WG.WIDE, False, 132),
              (WG.WIDE256, False, 0), (WG.SIXTY_FOUR, False, 5)]


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES)
@pytest.mark.parametrize("tile,shape_split,stream", _TMA_TILES,
                         ids=["tall", "small-split", "wide-stream", "wide256", "64-stream5"])
@pytest.mark.parametrize("dtype,sym", [(bf16, False), (f16, True)])
def test_gpu_wg_x_by_tma_against_float64(M, N, K, split, bias, tile, shape_split, stream,
                                         dtype, sym):
    _check_wg(4, dtype, M, N, K, split if shape_split else 1, bias, dict(tile, X_TMA=True), sym,
              stream=stream)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES[::2])
def test_gpu_wg6_and_decode_x_by_tma_against_float64(M, N, K, split, bias):
    _check_wg(6, bf16, M, N, K, split, bias, dict(WG.TALL, X_TMA=True), False)
    tile = dict(WG.DECODE_TILES[32], SCALE_AFTER=True, XSUM=True, X_TMA=True)
    _check_wg(4, bf16, M, N, K, 1, bias, tile, False, stream=264)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,split,bias", _GPU_SHAPES)
@pytest.mark.parametrize("tile,stream", [(WG.TALL, 0), (WG.SMALL, 0), (WG.WIDE, 132)],
                         ids=["tall", "small", "wide-stream"])
def test_gpu_wg_fp8_x_by_tma_against_float64(M, N, K, split, bias, tile, stream):
    _check_wg_fp8(M, N, K, 1 if stream else split, bias, dict(tile, X_TMA=True), False,
                  stream=stream)


# (tile with x by TMA, the tile without, x, REDUCE, bias, sym, bits): as dispatched (TALL_TMA
# one program a tile and K split 2, 6-bit too; WIDE_TMA), then symmetric weights (last).
_TMA_CASES = [("TALL_TMA", "TALL", "*bf16", 0, False, False, 4),
              ("TALL_TMA", "TALL", "*fp16", 0, False, False, 4),
              ("TALL_TMA", "TALL", "*bf16", 2, True, False, 6),
              ("WIDE_TMA", "WIDE", "*fp16", 0, True, False, 4),
              ("TALL_TMA", "TALL", "*bf16", 0, False, True, 4)]


@pytest.fixture(scope="module")
def sm90_tma_builds():
    """Each of _TMA_CASES compiled with and without x by TMA in one process."""
    return json_without_interpreter("""
        import json
        from q3n_compile.kernels import qlinear_wgmma as WG
        from tests.kernels import test_qlinear_wgmma as T
        print(json.dumps([T._compile_sm90(getattr(WG, tile), *rest)
                          for tma, plain, *rest in T._TMA_CASES for tile in (tma, plain)]))
    """)


def test_tma_tiles_compile_for_sm90_with_x_by_tma(sm90_tma_builds):
    assert len(sm90_tma_builds) == 2 * len(_TMA_CASES)
    builds = list(zip(sm90_tma_builds[::2], sm90_tma_builds[1::2]))
    # Symmetric weights: ptxas serialises the MMAs with X_TMA (every wait "all done"), why the
    # rule keeps them on TALL; should a compiler change this, re-measure and take them.
    sym_tma, sym_plain = builds.pop()
    assert {w.rstrip(" ;")[-3:] for w in sym_tma["waits"]} == {"0x0"}, sym_tma
    assert {w.rstrip(" ;")[-3:] for w in sym_plain["waits"]} == {"0x2"}, sym_plain
    for tma, plain in builds:
        where = f"{tma} / {plain}"
        assert tma["stack"] == 0 and tma["shared"] <= 227 * 1024, where
        # x's two halves a K block by two TMA copies; the cp.async left are the weight's
        # words, zero points and scales (fewer than with x's 16-byte pieces a thread).
        assert tma["tma"] == 2 and plain["tma"] == 0, where
        assert tma["cp_async"] < plain["cp_async"], where
        assert tma["mmas"] == plain["mmas"] == 8, where
        assert all(w.rstrip(" ;").endswith("0x2") for w in tma["waits"]), where
        assert tma["pdl"] and tma["gdc"] == ["griddepcontrol.wait",
                                             "griddepcontrol.launch_dependents"], where


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K,bits,split", [
    (129, 4096, 4096, 4, 1), (200, 4096, 12288, 4, 1), (256, 4096, 4096, 4, 1),
    (65, 4096, 12288, 4, 2), (100, 4096, 4096, 4, 2), (128, 4096, 4096, 6, 2),
    (200, 4096, 12288, 6, 1), (96, 12288, 4096, 4, 1)])
@pytest.mark.parametrize("dtype", [bf16, f16])
def test_gpu_dispatched_tall_tma_against_float64(M, N, K, bits, split, dtype):
    # As dispatched (TALL_TMA, and WIDE_TMA on 12288 columns): x permuted by the op into whole
    # tiles of rows, copied by TMA; K split 2 at 65-128 rows.
    cfg = Q.choose_path(M, N, K, bits, 128, "none", dtype, torch.device("cuda"))
    assert cfg["path"] == "wg" and cfg.get("X_TMA") and cfg["STAGES"] == 5, cfg
    assert cfg["SPLIT_K"] == split and cfg["BLOCK_N"] == (128 if N == 12288 else 64), cfg
    gen = _gen(f"wgtalltma{M}{N}{K}{bits}{dtype}")
    pw = _packed(gen, N, K, bits, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(dtype).cuda()
    b = torch.randn(N, generator=gen).to(dtype).cuda()
    check_against_float64(x, pw, b)
