"""The built-in models: shapes, determinism, causality, padding, GQA, errors, Dynamo-traceability."""

import pytest
import torch

from q3n_compile.models import MODEL_NAMES, SIZES, build_model, example_inputs, get_config

OUT_LAST_DIM = {"qwen3": "vocab_size", "llama": "vocab_size", "gpt2": "vocab_size", "bert": "hidden_size"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_builds_runs_and_is_deterministic(name):
    model = build_model(name, "tiny", seed=3)
    assert not model.training
    args = example_inputs(name, model, batch=3, seq_len=11, device="cpu", seed=1)
    with torch.no_grad():
        out = model(*args)
    expected = getattr(model.config, OUT_LAST_DIM[name])
    assert out.shape == (3, 11, expected)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Not degenerate: outputs vary across positions and are near unit scale.
    assert 0.1 < out.std().item() < 10.0

    again = build_model(name, "tiny", seed=3)
    args2 = example_inputs(name, again, batch=3, seq_len=11, device="cpu", seed=1)
    for a, b in zip(args, args2):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(again(*args2), out)

    other = build_model(name, "tiny", seed=4)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_weights_do_not_depend_on_dtype():
    # The bf16 model is the float64 model's weights rounded: what a float64 reference needs.
    m64 = build_model("llama", dtype=torch.float64, seed=5)
    m16 = build_model("llama", dtype=torch.bfloat16, seed=5)
    for (n, p64), p16 in zip(m64.named_parameters(), m16.parameters()):
        assert p64.dtype == torch.float64 and p16.dtype == torch.bfloat16
        assert torch.equal(p64.to(torch.bfloat16), p16), n
    assert m16.rotary_emb.inv_freq.dtype == torch.float32
    args = example_inputs("llama", m16, 2, 7)
    with torch.no_grad():
        ref = m64(*args)
        low = m16(*args)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert (low.double() - ref).abs().max() < 0.25 * ref.abs().max()


@pytest.mark.parametrize("name", ["qwen3", "llama", "gpt2"])
def test_decoders_are_causal(name):
    model = build_model(name)
    (ids,) = example_inputs(name, model, batch=2, seq_len=10)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # Masked scores get finfo.min added, so their weight is exactly zero: earlier logits identical.
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_bert_padding_is_ignored():
    model = build_model("bert")
    ids, mask = example_inputs("bert", model, batch=2, seq_len=12)
    assert mask.dtype == torch.int64
    assert mask[0].all() and not mask[-1].all() and mask[-1, 0] == 1
    padded = (mask[-1] == 0).nonzero().flatten()
    changed = ids.clone()
    changed[-1, padded] = (changed[-1, padded] + 7) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids, mask), model(changed, mask)
    keep = mask[-1] == 1
    assert torch.equal(a[-1, keep], b[-1, keep])
    assert torch.equal(a[0], b[0])
    # And the mask is used: without it, the padded ids do reach the unpadded positions.
    with torch.no_grad():
        c, d = model(ids), model(changed)
    assert not torch.allclose(c[-1, keep], d[-1, keep])


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_gqa_is_used(name):
    model = build_model(name)
    attn = model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features
    assert attn.v_proj.out_features == attn.k_proj.out_features
    assert attn.num_key_value_groups > 1
    assert (attn.q_norm is not None) == (name == "qwen3")
    bench = get_config(name, "bench")
    assert (bench.hidden_size, bench.num_heads, bench.num_kv_heads, bench.head_dim) == (4096, 32, 8, 128)
    assert bench.intermediate_size == 12288


def test_unknown_name_and_size_raise():
    with pytest.raises(ValueError, match=r"'mistral'.*qwen3, llama, gpt2, bert"):
        build_model("mistral")
    with pytest.raises(ValueError, match=r"'huge'.*tiny, bench"):
        build_model("qwen3", "huge")
    with pytest.raises(ValueError, match="'t5'"):
        example_inputs("t5", build_model("gpt2"), 1, 4)
    assert set(SIZES) == {"tiny", "bench"}


def test_example_inputs_device_and_limits():
    model = build_model("gpt2")
    (ids,) = example_inputs("gpt2", model, 1, 1)
    assert ids.shape == (1, 1) and ids.device == torch.device("cpu")
    with pytest.raises(ValueError, match="at most"):
        example_inputs("gpt2", model, 1, model.config.max_position + 1)
    ids, mask = example_inputs("bert", build_model("bert"), 1, 8)
    assert mask.tolist() == [[1] * 6 + [0] * 2]


def test_compile_dynamic_matches_eager():
    # Dynamo must trace the whole model with symbolic sizes: no graph break (fullgraph), and one
    # graph serves both lengths (no recompile). The counter wraps the "eager" backend.
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    model = build_model("qwen3")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for seq_len in (5, 13):
            args = example_inputs("qwen3", model, batch=2, seq_len=seq_len, seed=seq_len)
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
