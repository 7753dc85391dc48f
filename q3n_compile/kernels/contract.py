"""The one kernel contract every `q3n::<name>` op follows (DESIGN.md, "Kernels: one contract").

Each kernel module in this package holds, in this order:

1. the Triton kernel (`@triton.jit`), whose docstring states the math and the memory traffic;
2. the launcher, which chooses the variant (block sizes, constexpr specialisations) and launches;
3. `reference(...)`: plain torch with the same signature as the op, the ground truth on CPU;
4. the op registration through :func:`register_kernel_op` (a `torch.library.Library`
   definition with a fake implementation that computes its output sizes from the inputs'
   sizes, SymInts included: what DESIGN.md's ``custom_op`` registers, without custom_op's
   per-call Python wrappers; see :func:`register_kernel_op`);
5. `supports(...) -> str | None`: ``None`` if the kernel handles the arguments, otherwise the reason
   it does not. A pass asks this before it lowers anything, and counts the reason when it declines.

Where the op runs is decided per call by :func:`backend_for`:

- CUDA tensors run the Triton kernel;
- CPU tensors run the Triton kernel in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before Triton was imported (that is how the CPU test lane exercises kernels), and the torch
  reference otherwise.

The contract guarantees that the op's result does not depend on which of the three paths ran,
beyond the rounding the kernel's docstring states.

Launch overhead: a decode-sized kernel runs for ~10 µs, so the host time of a call matters as much
as the kernel. A launcher may cache everything that depends only on the call's signature (sizes,
strides, dtypes, device, flags) and launch through :class:`TritonLaunch`, which skips Triton's
per-launch argument binding once the kernel variant is known; :func:`launch` does that for a
launch site that builds its arguments per call, caching the :class:`TritonLaunch` by everything
but the pointers.

Programmatic dependent launch (Triton's ``launch_pdl`` option, sm_90 and later): a kernel so
launched may start before the kernel ahead of it in the stream has finished, so it must wait
(``griddepcontrol.wait``) before it reads anything an earlier kernel writes or writes anything
at all; what it does before the wait may only read inputs no kernel writes (weights). It is a
constexpr of the kernel (never under the interpreter, which runs no inline assembly) and part
of the launch options, so the cached launch differs with it (:func:`pdl_capable` says where it
can be). Dispatched for x's permutation and the wg tile (``qlinear_wgmma.with_pdl``), and at
one row with quantized activations for the activations' quantizer (``qlinear.act_quant_kernel``,
which lets the next kernel start at once) and the one-plane GEMV reading its codes
(``qlinear.qlinear_gemv1p_kernel``: its first words are loaded before the wait;
``qlinear.GEMV1P_PDL_AFTER_QUANT``). The GEMV with 16-bit x and the swapped tile
(``qlinear_swap.qlinear_mmT_kernel``: it waits first, so only the launch's latency is hidden)
take it only where a launch asks for it (cfg ``PDL``): there it did not shorten a decode step
(session 23, bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import Callable, Literal, Optional, TypeVar

import torch

Backend = Literal["triton", "interpreter", "reference"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels were built for its CPU interpreter.

    Triton chooses between compiled and interpreted functions when `@triton.jit` runs, at import,
    so the variable must be set before the kernel modules are imported; reading it later is only
    right if it was not changed in between, which is what the tests' conftest guarantees.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(device: torch.device) -> Backend:
    """Which implementation a kernel op runs for tensors on `device`."""
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and interpreter_enabled() and triton_available():
        return "interpreter"
    return "reference"


def pdl_capable(device: torch.device) -> bool:
    """Whether a Triton kernel on `device` may be launched with programmatic dependent launch:
    a CUDA GPU of sm_90 or later (never the interpreter, which runs no inline assembly), and
    Inductor's own PDL off (:func:`inductor_pdl`)."""
    if backend_for(device) != "triton" or inductor_pdl():
        return False
    return device_capability(device.index if device.index is not None
                             else torch.cuda.current_device()) >= (9, 0)


def inductor_pdl() -> bool:
    """Whether Inductor launches its kernels with PDL (``TORCHINDUCTOR_ENABLE_PDL=1``, torch's
    experimental switch; read from its config module where Inductor has been imported: where
    it has not, no Inductor kernel runs). q3n's PDL kernels then keep plain stream order:
    several of them let the next kernel start before their own wait (x's permutation, the wg
    tile, the activations' quantizer), while an Inductor kernel skips its wait where the
    kernel just before it does not write what it reads, which is safe only if every kernel
    lets the next start after its own wait (then the one before has finished whatever it
    waited for). With q3n's early triggers such an Inductor kernel could read a tensor that
    a kernel two launches back is still writing."""
    config = sys.modules.get("torch._inductor.config")
    triton_config = getattr(config, "triton", None)
    return bool(getattr(triton_config, "enable_pdl", False))


@functools.lru_cache(maxsize=None)
def device_capability(device_index: int) -> tuple[int, int]:
    """CUDA device `device_index`'s compute capability (cached: get_device_capability costs
    microseconds, and every decode call, host-bound, asks)."""
    return torch.cuda.get_device_capability(device_index)


def register_kernel_op(
    name: str,
    impl: Callable,
    fake: Callable,
    *,
    schema: str | None = None,
) -> torch._ops.OpOverloadPacket:
    """Register `impl` as the op ``q3n::<name>`` with `fake` as its FakeTensor implementation.

    `impl` is the dispatching function (Triton, interpreter or reference by :func:`backend_for`);
    it must not mutate its inputs. The schema is inferred from `impl`'s annotations unless given.
    Returns ``torch.ops.q3n.<name>``.

    Registered as ``torch.library.custom_op`` does it (the same schema, the pt2_compliant tag,
    the fake), less its per-call Python layers: `impl` is the op's kernel for every backend
    (``CompositeExplicitAutograd``), with no wrapper between the dispatcher and it, and the
    autograd kernel is a small one that refuses inputs needing a gradient (these ops serve
    inference graphs, which call them below the autograd keys, skipping it). A no-op with
    qlinear's signature cost 17.0 µs a call below autograd as a custom_op and 12.3 µs
    registered this way (CPU, ``bench/bench_op_dispatch.py``, session 11).
    """
    qualname = f"q3n::{name}"
    inferred = schema is None
    if inferred:
        schema = torch.library.infer_schema(impl, mutates_args=())
    _LIB.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    packet = getattr(torch.ops.q3n, name)
    _LIB.impl(name, _autograd_kernel(qualname, packet.default), "Autograd", with_keyset=True)
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if inferred:  # the schema's argument names are impl's: a call's kwargs fit both
        _IMPLS[packet.default] = impl
    return packet


# q3n's ops, one fragment of the namespace (kept alive: dropping it would unregister them).
_LIB = torch.library.Library("q3n", "FRAGMENT")


def _autograd_kernel(qualname: str, overload) -> Callable:
    """The ops' autograd kernel: below the autograd keys as it is, an error where a gradient
    would be needed (no op defines a backward; passing through would give silently wrong
    gradients)."""
    below = torch._C._after_autograd_keyset

    def kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad
                for a in (*args, *kwargs.values())):
            raise RuntimeError(
                f"{qualname} has no gradient: q3n's kernel ops serve inference graphs. Call it "
                "under torch.no_grad() / torch.inference_mode(), or detach its inputs; q3n "
                "compiles graphs that need gradients without its inference-only passes.")
        return overload.redispatch(keyset & below, *args, **kwargs)
    return kernel


# Each op's Python implementation, by its overload, filled at registration (import) time only:
# an inference graph run by q3n's own executor calls these directly (:func:`python_impl`).
_IMPLS: dict = {}


def python_impl(target) -> Optional[Callable]:
    """The Python implementation of the q3n kernel op `target` (an OpOverload), or None.

    Calling it is what the op's dispatch ends in for real tensors without autograd: the
    dispatcher's round trip into Python cost 25-95 µs a call on the H200 machine's host
    (``q3n::qlinear`` below the autograd keys against its implementation, s11run1-5), which a
    decode step pays per kernel op when nothing captures it in a CUDA graph."""
    return _IMPLS.get(target)


class TritonLaunch:
    """One launch of a Triton kernel whose grid, non-pointer arguments and options are fixed
    (a launcher builds one per call signature and caches it); ``launch(*pointers)`` launches.

    ``args`` are the kernel's remaining parameters after the pointers, in declaration order,
    constexprs included (:meth:`ordered` builds them); ``options`` are Triton's launch options
    (``num_warps``, ``num_stages``).

    The first launch for an alignment of the pointers (and current device) goes through Triton's
    ``JITFunction`` (binding, specialisation, cache lookup, a compile if new) and keeps the
    ``CompiledKernel`` it returns; later launches call that kernel's launcher directly with the
    arguments Triton itself passes it (what Inductor's generated launchers do), skipping ~30 µs of
    Python per launch. That is the same kernel: Triton specialises a launch on the arguments'
    types and constexprs, on ints equal to 1 or divisible by 16 (all fixed here), and on each
    pointer's 16-byte alignment, which is part of the key. Triton's path is taken for every
    launch when ``fast`` is False (the interpreter), when launch hooks are installed (profilers
    see every launch), or when the compiled object lacks the launcher API of Triton 3.x.
    """

    __slots__ = ("kernel", "grid", "args", "options", "fast", "compiled")

    def __init__(self, kernel, grid, args, options, *, fast: bool):
        self.kernel, self.grid = kernel, tuple(grid) + (1,) * (3 - len(grid))
        self.args, self.options, self.fast = tuple(args), dict(options), bool(fast)
        self.compiled: dict = {}

    @staticmethod
    def ordered(kernel, n_pointers: int, scalars: tuple, constexprs: dict) -> tuple:
        """The parameters after the first ``n_pointers``: ``scalars`` (positional, in order),
        then the constexprs by name in the kernel's declaration order (KeyError if one is
        missing, ValueError if one is left over)."""
        names = kernel.arg_names[n_pointers + len(scalars):]
        extra = set(constexprs) - set(names)
        if extra:
            raise ValueError(f"{kernel}: unknown constexprs {sorted(extra)}")
        return tuple(scalars) + tuple(constexprs[name] for name in names)

    def __call__(self, *pointers):
        if self.fast:
            drv = _triton_driver().active
            device = drv.get_current_device()
            key = device
            for t in pointers:
                # A host tensor descriptor (TMA) is keyed by its base tensor's alignment.
                key = (key << 1) | (getattr(t, "base", t).data_ptr() & 15 == 0)
            compiled = self.compiled.get(key)
            if compiled is not None and _no_launch_hooks():
                g0, g1, g2 = self.grid
                compiled.run(g0, g1, g2, drv.get_current_stream(device), compiled.function,
                             compiled.packed_metadata, None, None, None, *pointers, *self.args)
                return
            compiled = self.kernel[self.grid](*pointers, *self.args, **self.options)
            if all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
                self.compiled[key] = compiled
            return
        self.kernel[self.grid](*pointers, *self.args, **self.options)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints, for launch paths: Triton 3.6's ``triton.cdiv`` and
    ``triton.next_power_of_2`` are constexpr functions whose Python call costs microseconds."""
    return -(-a // b)


def ticket_split_k_plan(k_extent: int, block_k: int, want: int, y: torch.Tensor, tiles: int,
                        tickets: Optional[Callable], who: str) -> tuple:
    """(split, k_per_split, workspace, counters) of a one-launch split-K GEMM finished by
    ``tiles.ticket_split_k``: at most `want` splits of whole `block_k` blocks over `k_extent`
    channels, none empty; for more than one split a float32 workspace ``[split, *y.shape]`` and
    `tickets(device, tiles)`'s counters, else `y` in both places (never read: the kernel's
    SPLIT constexpr is off)."""
    blocks = cdiv(k_extent, block_k)
    split = max(1, min(int(want), blocks))
    k_per_split = cdiv(blocks, split) * block_k
    split = cdiv(k_extent, k_per_split)  # no empty split
    if split == 1:
        return 1, k_per_split, y, y
    if tickets is None:
        raise ValueError(f"q3n::qlinear: {who}'s split-K needs the ticket counters")
    ws = torch.empty((split, *y.shape), dtype=torch.float32, device=y.device)
    return split, k_per_split, ws, tickets(y.device, tiles)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n for n >= 1 (0 for 0), as ``triton.next_power_of_2``, in plain
    Python."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def signature(t: Optional[torch.Tensor]):
    """What a launch plan depends on of a tensor argument: (shape, strides, dtype, device), or
    None for an absent optional tensor. A part of the launchers' cache keys."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def remember(cache: dict, key, value, limit: int) -> None:
    """``cache[key] = value``, the cache emptied first when it holds `limit` entries: the
    launchers' per-signature caches stay bounded when a dynamic size changes every call."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def capturing(device: torch.device) -> bool:
    """True while the current stream of `device` (a CUDA device) is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_Made = TypeVar("_Made")


def made_off_graph_pools(make: Callable[[], _Made], device: torch.device) -> _Made:
    """``make()``, run so that its CUDA allocations land outside every CUDA-graph memory pool,
    for a tensor a launcher keeps across calls (a cache, a counter buffer).

    Inductor's CUDA-graph trees warm a graph up with every allocation of the warming thread
    routed into the graph's private pool (``_cuda_beginAllocateCurrentThreadToPool``, whatever
    the stream), and refuse a tensor left alive there that is not an output ("tensor(s) in the
    cudagraph pool not tracked as outputs": quantized linears' ticket counters, s10run8; the
    norm_linear kernel's placeholder, s13run1); a side stream of the same thread does not
    escape it (s11run1). Another thread's allocations are not routed, so a short-lived helper
    thread runs `make` on its own stream and waits for it before this thread goes on: the result
    is ready for any stream. Not for use while a graph is being captured (:func:`capturing`):
    there a launcher makes what it needs inside the graph and does not keep it. On a CPU,
    ``make()`` as it is."""
    if device.type != "cuda":
        return make()
    if capturing(device):
        raise RuntimeError("made_off_graph_pools: called during a CUDA graph capture")
    made: list = []

    def run():
        try:
            with torch.cuda.device(device):
                out = make()
                torch.cuda.current_stream(device).synchronize()
            made.append(out)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            made.append(exc)

    helper = threading.Thread(target=run, name="q3n-off-graph-pools")
    helper.start()
    helper.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


_LAUNCHES: dict = {}
_MAX_LAUNCHES = 8192


def launch(kernel, grid: tuple, pointers: tuple, scalars: tuple, constexprs: dict,
           options: dict, *, fast: bool) -> None:
    """``kernel[grid](*pointers, *scalars, **constexprs, **options)``, through a
    :class:`TritonLaunch` kept per (kernel, grid, the pointers' dtypes, scalars, constexprs,
    options, fast): the same launch with a few µs of key building in place of Triton's argument
    binding (~30 µs a launch in Triton 3.6). A pointer may be a host tensor descriptor (TMA),
    which Triton's launcher encodes into a tensor map at each launch. The pointers' dtypes are
    part of the key because
    Triton compiles a variant per pointer type and a TritonLaunch keeps one per alignment only.
    Every parameter after the pointers is a plain value (an int, float, bool, str or None) and
    every constexpr is named (TritonLaunch.ordered). Bounded: the cache is emptied when it
    reaches :data:`_MAX_LAUNCHES` entries (a dynamic size that changes every call fills it)."""
    key = (kernel, grid, tuple([_pointer_type(p) for p in pointers]), scalars,
           tuple(constexprs.items()), tuple(options.items()), fast)
    cached = _LAUNCHES.get(key)
    if cached is None:
        args = TritonLaunch.ordered(kernel, len(pointers), scalars, constexprs)
        cached = TritonLaunch(kernel, grid, args, options, fast=fast)
        remember(_LAUNCHES, key, cached, _MAX_LAUNCHES)
    cached(*pointers)


def _pointer_type(p):
    """What of a pointer argument Triton compiles a variant for: a tensor's dtype; a host tensor
    descriptor's (TMA: Gluon's or Triton's ``TensorDescriptor``) dtype, block shape and shared
    layout, which its signature type names."""
    if isinstance(p, torch.Tensor):
        return p.dtype
    return (p.base.dtype, tuple(p.block_shape), repr(getattr(p, "layout", None)))


def descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for in-kernel tensor descriptors (``tl.make_tensor_descriptor``: Triton
    asks for 128 bytes per descriptor and program at each launch). torch's caching allocator, on
    the current device and stream (the launch's), as Inductor's launchers do: cheap,
    stream-ordered, graph-capturable."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_descriptor_allocator() -> None:
    """Install :func:`descriptor_scratch` as Triton's allocator unless one is set; call it before
    every GPU launch of a kernel that builds tensor descriptors. Triton keeps the allocator in a
    ContextVar, so this runs per call (~0.1 us): a thread or context that never set one would
    otherwise fail the launch with "no allocator was set"."""
    allocation = _triton_allocation()
    allocator = getattr(allocation, "_allocator", None)
    if allocator is None or allocator.get() is getattr(allocation, "_NULL_ALLOCATOR", None):
        import triton

        triton.set_allocator(descriptor_scratch)


@functools.lru_cache(maxsize=1)
def _triton_allocation():
    """Where Triton keeps its launch-time allocator (Triton 3.x), looked up once."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover - other Triton versions: always install ours
        return None
    return _allocation


@functools.lru_cache(maxsize=1)
def _triton_driver():
    from triton.runtime import driver

    return driver


@functools.lru_cache(maxsize=1)
def _triton_runtime_knobs():
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - Triton < 3.4: always Triton's own launch path
        return None
    return knobs.runtime


def _no_launch_hooks() -> bool:
    """True when no launch enter/exit hook is installed (Triton 3.6 keeps them as HookChains,
    empty unless a profiler added one; older versions as None or a function)."""
    rt = _triton_runtime_knobs()
    if rt is None:
        return False
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True
