"""GPU lane: the memory plan and CUDA graphs on CUDA (run with `pytest -m gpu` on an H200)."""

import threading

import pytest
import torch

import q3n_compile
from q3n_compile.models import build_model, example_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _err_vs_fp64(out, name, inputs):
    exact = build_model(name, "tiny", dtype=torch.float64, device="cpu")
    with torch.no_grad():
        ref = exact(*[x.cpu() for x in inputs])
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", ["qwen3", "llama", "gpt2", "bert"])
def test_planned_models_on_cuda_bf16(name):
    model = build_model(name, "tiny", dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(model, backend="q3n", options={"executor": "q3n", "verify": True})
    with torch.no_grad():
        inputs = example_inputs(name, model, 2, 77, device="cuda", seed=1)
        eager = model(*inputs)
        got = compiled(*inputs)
        first = got.clone()
        other = example_inputs(name, model, 2, 77, device="cuda", seed=2)
        got2 = compiled(*other)
        torch.cuda.synchronize()
    assert torch.equal(got, first), "a later call changed an earlier result"
    q3n_err, eager_err = _err_vs_fp64(got, name, inputs), _err_vs_fp64(eager, name, inputs)
    assert q3n_err <= 1.5 * eager_err + 1e-3, (q3n_err, eager_err)
    assert _err_vs_fp64(got2, name, other) <= 1.5 * _err_vs_fp64(model(*other), name, other) + 1e-3
    (report,) = q3n_compile.reports()
    assert report["verify"]["status"] == "passed"
    memory = report["memory"]
    assert memory["status"] == "applied" and memory["verified"]
    assert memory["lower_bound_bytes"] <= memory["arena_bytes"] <= memory["naive_bytes"]
    assert memory["ratio"] <= 1.02
    assert list(memory["devices"]) == ["cuda:0"]


def test_planned_dynamic_lengths_on_cuda():
    from torch._dynamo.utils import counters

    model = build_model("qwen3", "tiny", dtype=torch.float16, device="cuda")
    compiled = torch.compile(model, backend="q3n", dynamic=True, options={"executor": "q3n"})
    counters.clear()
    with torch.no_grad():
        for seq_len in (129, 200, 255, 1000):  # buckets 256, 256, 256, 1024
            ids = example_inputs("qwen3", model, 1, seq_len, device="cuda")[0]
            out, ref = compiled(ids), model(ids)
            assert _rel_err(out.float(), ref.float()) < 2e-2
    assert counters["stats"]["unique_graphs"] == 1
    memory = q3n_compile.reports()[0]["memory"]
    assert sorted(max(b["symbols"].values()) for b in memory["buckets"]) == [256, 1024]


@pytest.mark.parametrize("executor", ["q3n", "auto"])
def test_cuda_graphs_replay_with_new_inputs(executor):
    """q3n's capture (executor 'q3n') and the default, mode='reduce-overhead' (Inductor's CUDA graph
    trees over the rewritten graph): new inputs each call, and every result stays valid."""
    model = build_model("qwen3", "tiny", dtype=torch.float32, device="cuda")
    if executor == "q3n":
        compiled = torch.compile(model, backend="q3n", options={"executor": "q3n", "cuda_graphs": True})
    else:
        compiled = torch.compile(model, backend="q3n", mode="reduce-overhead")
    results = []
    with torch.no_grad():
        for seed in range(5):  # warm-up, capture + replay, then replays; a new tensor each call
            ids = example_inputs("qwen3", model, 2, 33, device="cuda", seed=seed)[0]
            got = compiled(ids)
            want = model(ids)
            assert _rel_err(got, want) < 1e-4, seed
            results.append((got, want.clone()))
    torch.cuda.synchronize()
    for got, want in results:  # outputs are cloned out of the graph: none was overwritten
        assert _rel_err(got, want) < 1e-4
    report = q3n_compile.reports()[0]
    if executor == "auto":
        assert report["executor"] == "inductor"
        assert report["runtime"]["cuda_graphs"].startswith("applied: Inductor's CUDA graph trees")
        return
    assert report["runtime"]["cuda_graphs"].startswith("on"), report["runtime"]
    stats = report["runtime"]["cuda_graph_stats"]
    assert stats["captured"] == 1 and stats["failed"] == [], stats
    assert report["memory"]["status"] == "applied"


def test_cuda_graphs_capture_per_shape_and_without_a_plan():
    model = build_model("gpt2", "tiny", dtype=torch.float32, device="cuda")
    compiled = torch.compile(model, backend="q3n", dynamic=True,
                             options={"executor": "q3n", "cuda_graphs": True, "memory_plan": False})
    with torch.no_grad():
        for _ in range(3):
            for seq_len in (17, 40):
                ids = example_inputs("gpt2", model, 1, seq_len, device="cuda", seed=seq_len + _)[0]
                assert _rel_err(compiled(ids), model(ids)) < 1e-4
    report = q3n_compile.reports()[0]
    assert report["memory"]["status"] == "disabled"
    assert report["runtime"]["cuda_graph_stats"]["captured"] == 2


def test_decode_with_cuda_graphs_writes_the_cache_in_place():
    """A static KV cache is a mutated input: captured at its address and written in place on
    replay, so every step sees the positions earlier steps wrote."""
    from q3n_compile.models import new_kv_cache

    model = build_model("qwen3", "tiny", dtype=torch.float32, device="cuda")
    compiled = torch.compile(model, backend="q3n", options={"executor": "q3n", "cuda_graphs": True})
    ids = example_inputs("qwen3", model, 2, 9, device="cuda", seed=3)[0]
    eager_cache, q3n_cache = new_kv_cache(model, 2, 32), new_kv_cache(model, 2, 32)
    positions = [torch.tensor([p], device="cuda") for p in range(32)]
    with torch.no_grad():
        model(ids, kv_cache=eager_cache, cache_position=torch.arange(9, device="cuda"))
        model(ids, kv_cache=q3n_cache, cache_position=torch.arange(9, device="cuda"))
        token = ids[:, -1:]
        for step in range(9, 17):
            want = model(token, kv_cache=eager_cache, cache_position=positions[step])
            got = compiled(token, kv_cache=q3n_cache, cache_position=positions[step])
            assert _rel_err(got, want) < 1e-4, step
            token = want.argmax(-1)
    torch.testing.assert_close(q3n_cache.keys[-1], eager_cache.keys[-1], rtol=1e-4, atol=1e-4)
    report = q3n_compile.reports()[-1]
    assert "mutated inputs used in place" in report["runtime"]["cuda_graphs"]
    stats = report["runtime"]["cuda_graph_stats"]
    # One capture for the step's signature: the later steps replayed it, and they could only match
    # eager if each replay wrote its position into the caller's cache.
    assert stats["captured"] == 1 and stats["failed"] == [], stats
    assert report["passes"]["memory_plan"]["detail"]["input_mutations"]["rewritten"] == 2 * len(q3n_cache.keys)


def test_decode_with_inductor_cuda_graphs_writes_the_cache_in_place():
    """executor='inductor' + cuda_graphs: Inductor's CUDA graph trees capture the rewritten graph
    with the static-address KV cache used in place (not copied), so replays write the caller's
    cache and later steps see it."""
    from q3n_compile.models import new_kv_cache

    model = build_model("qwen3", "tiny", dtype=torch.float32, device="cuda")
    compiled = torch.compile(model, backend="q3n", options={"executor": "inductor", "cuda_graphs": True})
    ids = example_inputs("qwen3", model, 2, 9, device="cuda", seed=4)[0]
    eager_cache, q3n_cache = new_kv_cache(model, 2, 32), new_kv_cache(model, 2, 32)
    positions = [torch.tensor([p], device="cuda") for p in range(32)]
    with torch.no_grad():
        model(ids, kv_cache=eager_cache, cache_position=torch.arange(9, device="cuda"))
        model(ids, kv_cache=q3n_cache, cache_position=torch.arange(9, device="cuda"))
        token = ids[:, -1:]
        for step in range(9, 17):
            want = model(token, kv_cache=eager_cache, cache_position=positions[step])
            got = compiled(token, kv_cache=q3n_cache, cache_position=positions[step]).clone()
            assert _rel_err(got, want) < 1e-4, step
            token = want.argmax(-1)
    torch.testing.assert_close(q3n_cache.keys[-1], eager_cache.keys[-1], rtol=1e-4, atol=1e-4)
    report = q3n_compile.reports()[-1]
    assert report["executor"] == "inductor"
    assert report["runtime"]["cuda_graphs"].startswith("applied: Inductor's CUDA graph trees"), report["runtime"]
    assert report["passes"]["attention"]["rewritten"] == len(q3n_cache.keys)


def test_cuda_graphs_input_copy_into_static_buffers():
    """The caller's tensor is copied into the graph's static input buffer; changing the caller's
    tensor in place afterwards changes the next result, as it would in eager."""
    model = build_model("llama", "tiny", dtype=torch.float32, device="cuda")
    compiled = torch.compile(model, backend="q3n", options={"executor": "q3n", "cuda_graphs": True})
    ids = example_inputs("llama", model, 1, 24, device="cuda", seed=0)[0]
    with torch.no_grad():
        for _ in range(3):
            compiled(ids)
        ids.copy_(example_inputs("llama", model, 1, 24, device="cuda", seed=9)[0])
        assert _rel_err(compiled(ids), model(ids)) < 1e-4
        fresh = example_inputs("llama", model, 1, 24, device="cuda", seed=10)[0].clone()
        assert _rel_err(compiled(fresh), model(fresh)) < 1e-4


def test_two_threads_on_two_streams():
    model = build_model("qwen3", "tiny", dtype=torch.float32, device="cuda")
    compiled = torch.compile(model, backend="q3n", options={"executor": "q3n"})
    inputs = [example_inputs("qwen3", model, 2, 50, device="cuda", seed=s)[0] for s in range(2)]
    with torch.no_grad():
        wants = [model(x) for x in inputs]
        compiled(inputs[0])
    torch.cuda.synchronize()
    barrier = threading.Barrier(2)
    errors = []

    def worker(i):
        stream = torch.cuda.Stream()
        try:
            barrier.wait()
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(20):
                    got = compiled(inputs[i])
                    stream.synchronize()
                    if _rel_err(got, wants[i]) > 1e-4:
                        errors.append(f"thread {i}: wrong result")
                        return
        except Exception as err:  # pragma: no cover - reported below
            errors.append(f"thread {i}: {err!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_measured_peak_matches_the_reported_estimates():
    """The report's peak estimates are honest: over a warm call, the peak above weights and inputs
    is the arena plus the unplanned values at their worst moment (with the plan), or everything
    alive at the worst moment (without). The CUDA allocator rounds blocks up, hence the slack."""
    model = build_model("qwen3", "tiny", dtype=torch.float32, device="cuda")
    ids = example_inputs("qwen3", model, 4, 512, device="cuda")[0]
    with torch.no_grad():
        model(ids)  # cuBLAS's workspace is allocated on first use: before the baseline
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for plan in (True, False):
        torch._dynamo.reset()
        q3n_compile.reset_reports()
        compiled = torch.compile(model, backend="q3n", options={"executor": "q3n", "memory_plan": plan})
        with torch.no_grad():
            compiled(ids)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = compiled(ids)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        memory = q3n_compile.reports()[0]["memory"]
        if plan:
            estimate = memory["peak_estimate_bytes"]
        else:
            estimate = None
        print(f"memory_plan={plan}: measured peak above weights {peak / 2**20:.2f} MiB, "
              f"estimate {None if estimate is None else round(estimate / 2**20, 2)} MiB")
        if estimate is not None:
            assert peak <= 1.1 * estimate + 4 * 2**20, (peak, memory)
            assert peak >= 0.9 * memory["arena_bytes"]
        del out, compiled
