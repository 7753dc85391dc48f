"""The bench's models: the static KV cache, qwen3-next, transformers twins, local folders, factories."""

import textwrap
import time

import pytest
import torch

from q3n_compile import compare
from q3n_compile.models import (DECODER_NAMES, HF_MODEL_NAMES, KVCache, build_model, example_inputs,
                                new_kv_cache)

transformers = pytest.importorskip("transformers")

from q3n_compile import hf_models  # noqa: E402


pytestmark = pytest.mark.usefixtures("reference_kernels")



@pytest.mark.parametrize("name", DECODER_NAMES)
def test_kv_cache_decoding_matches_the_full_forward(name):
    model = build_model(name, "tiny", seed=2)
    (ids,) = example_inputs(name, model, batch=2, seq_len=11, seed=3)
    cache = new_kv_cache(model, batch=2, max_len=16)
    assert isinstance(cache, KVCache) and cache.max_len == 16 and cache.batch == 2
    assert cache.keys[0].shape == (2, model.config.num_kv_heads, 16, model.config.head_dim)
    with torch.no_grad():
        full = model(ids)
        # A prompt of 6, then one token per call at explicit positions.
        parts = [model(ids[:, :6], kv_cache=cache)]
        for p in range(6, 11):
            parts.append(model(ids[:, p:p + 1], kv_cache=cache, cache_position=torch.tensor([p])))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    # Slots past the last position stay untouched.
    assert cache.keys[0][:, :, 11:].abs().sum() == 0
    cache.reset()
    assert all(t.abs().sum() == 0 for t in cache.keys + cache.values)


@pytest.mark.parametrize("name", DECODER_NAMES)
def test_decode_prompt_prefilled_in_batch_slices(name, monkeypatch):
    # The decode cases' eager prompt prefill in slices of the batch (a budget of two rows'
    # scores here: slices of 2, 2, 1) fills the same cache and gives the same last logits as
    # one call over the whole batch.
    model = build_model(name, "tiny", seed=4)
    (ids,) = example_inputs(name, model, batch=5, seq_len=9, seed=5)
    workload = compare.Workload(label=name, kind="builtin", model=model, decode="builtin")
    heads, max_len = model.config.num_heads, 14
    assert compare.prefill_rows(heads, 9, max_len, 5, budget=2 * 4 * heads * 9 * max_len) == 2
    assert compare.prefill_rows(heads, 9, max_len, 5, budget=1) == 1
    assert compare.prefill_rows(heads, 9, max_len, 5, budget=1 << 40) == 5
    outs, caches = [], []
    for budget in (1 << 40, 2 * 4 * heads * 9 * max_len):
        monkeypatch.setattr(compare, "PREFILL_SCORES_BYTES", budget)
        dec = compare._Decoder(workload, model, None, 5, max_len, "cpu")
        with torch.no_grad():
            outs.append(dec.prefill(ids))
        caches.append(dec.cache)
    assert outs[0].shape == (5, 1, model.config.vocab_size)
    for out in outs:  # not a view holding the prompt's [5, 9, vocab] logits
        assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert caches[1].keys[0][:, :, :9].abs().sum(dim=(1, 2, 3)).gt(0).all()  # every row written
    assert caches[1].keys[0][:, :, 9:].abs().sum() == 0


def test_kv_cache_errors():
    with pytest.raises(ValueError, match="only the built-in decoders"):
        new_kv_cache(build_model("bert"), 1, 8)
    gpt2 = build_model("gpt2")
    with pytest.raises(ValueError, match="at most"):
        new_kv_cache(gpt2, 1, gpt2.config.max_position + 1)


def test_kv_cache_decode_compiles_once_for_every_position():
    # Positions are tensors: one graph serves every decode step (fullgraph, no recompile).
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    model = build_model("qwen3", "tiny")
    (ids,) = example_inputs("qwen3", model, batch=2, seq_len=9)
    cache = new_kv_cache(model, 2, 12)
    step = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        full = model(ids)
        model(ids[:, :5], kv_cache=cache)
        outs = [step(ids[:, p:p + 1].contiguous(), kv_cache=cache, cache_position=torch.tensor([p]))
                for p in range(5, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 5:9], rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", DECODER_NAMES)
def test_hf_twin_has_the_same_logits(name):
    model = build_model(name, "tiny", seed=1)
    (ids,) = example_inputs(name, model, batch=2, seq_len=7)
    twin = hf_models.hf_twin(model, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(twin(ids, use_cache=False).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_qwen3_next_tiny_builds_runs_and_compiles_with_q3n():
    # transformers' Qwen3-Next with a tiny random config: 3 linear-attention (gated delta rule,
    # torch fallback without flash-linear-attention) + 1 gated full-attention layer, MoE, zero-centred
    # RMSNorm. Compiling it with q3n takes ~5-15 s on a CPU.
    assert HF_MODEL_NAMES == ("qwen3-next",)
    model = build_model("qwen3-next", "tiny")
    config = model.config
    assert config.model_type == "qwen3_next"
    assert config.layer_types.count("linear_attention") == 3 and config.layer_types.count("full_attention") == 1
    assert config.num_experts == 8 and config.num_experts_per_tok == 2
    (ids,) = example_inputs("qwen3-next", model, batch=2, seq_len=9)
    with torch.no_grad():
        ref = model(ids)
        assert ref.shape == (2, 9, config.vocab_size) and torch.isfinite(ref).all()
        start = time.perf_counter()
        out = torch.compile(model, backend="q3n")(ids)
        took = time.perf_counter() - start
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    import q3n_compile

    reports = q3n_compile.reports()
    assert reports and all(r["inference"] for r in reports)
    print(f"qwen3-next tiny: q3n compile + first call {took:.1f} s, {len(reports)} graph(s)")


def test_local_transformers_folder(tmp_path, capsys):
    # A tiny transformers llama saved with save_pretrained, benched from its folder.
    twin = hf_models.hf_twin(build_model("llama", "tiny", seed=4))
    twin.save_pretrained(tmp_path / "tiny-llama")
    wrapper, kind = hf_models.load_local(tmp_path / "tiny-llama", dtype=torch.float32, device="cpu")
    assert kind == "causal" and isinstance(wrapper, hf_models.CausalLMLogits)
    (ids,) = example_inputs("llama", build_model("llama", "tiny", seed=4), 1, 6)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids), build_model("llama", "tiny", seed=4)(ids), rtol=1e-5, atol=1e-5)

    result = compare.bench(str(tmp_path / "tiny-llama"), device="cpu", backends=["q3n"], seq_lens=[7],
                           decode_batches=[], repeats=2, warmup=1)
    assert result.meta["kind"] == "hf-causal"
    assert [(r.phase, r.backend) for r in result.rows] == [("prefill", "eager"), ("prefill", "q3n")]
    for r in result.rows:
        assert r.error is None, r.error
    assert result.rows[1].max_abs_err < 1e-4
    # transformers' StaticCache drives the decode phase of a transformers causal LM (eager here;
    # compiled decoding of transformers models is covered by the generate tests).
    result = compare.bench(str(tmp_path / "tiny-llama"), device="cpu", backends={}, seq_lens=[],
                           decode_batches=[2], decode_context=5, decode_steps=3, repeats=1, warmup=1)
    (row,) = result.rows
    assert row.phase == "decode" and row.error is None and row.tokens_per_s > 0 and row.token_match == 1.0


def test_local_encoder_folder(tmp_path):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37)
    transformers.BertModel(config).save_pretrained(tmp_path)
    wrapper, kind = hf_models.load_local(tmp_path, dtype=torch.float32, device="cpu")
    assert kind == "encoder" and isinstance(wrapper, hf_models.EncoderHidden)
    result = compare.bench(str(tmp_path), device="cpu", backends={}, seq_lens=[6], batches=[2], repeats=1)
    (row,) = result.rows
    assert row.error is None and row.phase == "prefill" and row.batch == 2
    assert "decode skipped" in " ".join(result.notes)


def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_factory_mod.py").write_text(textwrap.dedent("""
        import torch

        def make(device, dtype):
            model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).to(device, dtype)
            return model, (torch.randn(3, 5, 16, dtype=dtype),)

        def just_a_module():
            return torch.nn.Linear(4, 4)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = compare.bench("my_factory_mod:make", device="cpu", backends=["q3n"], repeats=2)
    assert [(r.backend, r.batch, r.seq_len) for r in result.rows] == [("eager", 3, 5), ("q3n", 3, 5)]
    assert all(r.error is None for r in result.rows)
    assert result.rows[1].max_abs_err < 1e-5
    with pytest.raises(hf_models.ModelLoadError, match="without example inputs"):
        compare.bench("my_factory_mod:just_a_module", device="cpu", backends={})
    # The file form, and a factory returning a transformers model without inputs.
    (tmp_path / "hf_factory.py").write_text(textwrap.dedent("""
        import transformers

        def make(size="tiny"):
            cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=64)
            return transformers.GPT2LMHeadModel(cfg)
    """))
    result = compare.bench(f"{tmp_path / 'hf_factory.py'}:make", device="cpu", backends={}, seq_lens=[6],
                           decode_batches=[1], decode_context=4, decode_steps=2, repeats=1)
    assert [(r.phase, r.error) for r in result.rows] == [("prefill", None), ("decode", None)]


def test_unknown_model_for_the_api():
    with pytest.raises(hf_models.ModelLoadError, match="unknown model 'mistral'.*qwen3-next.*minilm"):
        compare.bench("mistral", device="cpu", backends={})
