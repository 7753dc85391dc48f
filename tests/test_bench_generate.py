"""transformers' model.generate with a static cache, compiled with backend="q3n", and its bench phase."""

import pytest
import torch

from q3n_compile import compare
from q3n_compile.models import build_model

pytest.importorskip("transformers")

from q3n_compile import hf_models  # noqa: E402


pytestmark = pytest.mark.usefixtures("reference_kernels")



def test_generate_tiny_llama_with_q3n_matches_eager():
    import q3n_compile

    hf = hf_models.hf_twin(build_model("llama", "tiny", seed=5))
    assert type(hf).__name__ == "LlamaForCausalLM"
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, hf.config.vocab_size, (2, 7), generator=gen)
    with torch.no_grad():
        eager = hf_models.generate_tokens(hf, prompt, 6, None)
        compiled = hf_models.generate_tokens(hf, prompt, 6, {"backend": "q3n"})
        again = hf_models.generate_tokens(hf, prompt, 6, {"backend": "q3n"})
    assert eager.shape == (2, 6)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    reports = q3n_compile.reports()
    # The decode step went through q3n (transformers compiles the per-token forward).
    assert reports and any("q3n" in str(r["options"]) or r["inference"] for r in reports)
    assert hasattr(hf, "_compiled_call")
    hf_models.forget_compiled_call(hf)
    assert not hasattr(hf, "_compiled_call")


def test_bench_generate_phase_reports_tokens_per_second():
    # Only the generate phase (no prefill, no decode rows); batch 2.
    result = compare.bench("llama", "tiny", device="cpu", backends=["q3n"], seq_lens=[], decode_batches=[],
                           decode_context=5, generate=4, generate_batch=2, repeats=2, warmup=1)
    assert [r.phase for r in result.rows] == ["generate", "generate"]
    rows = [r for r in result.rows if r.phase == "generate"]
    assert [r.backend for r in rows] == ["eager", "q3n"]
    for r in rows:
        assert r.error is None, r.error
        assert r.new_tokens == 4 and r.tokens_per_s > 0
        assert r.compile_s is None if r.backend == "eager" else r.compile_s > 0
        assert r.token_match == 1.0
    table = compare.format_table(result.rows, result)
    assert "generate (transformers model.generate, static cache)" in table


def test_generate_is_skipped_with_a_note_for_an_encoder():
    result = compare.bench("bert", "tiny", device="cpu", backends={}, seq_lens=[5], generate=3, repeats=1)
    assert [r.phase for r in result.rows] == ["prefill"]
    assert any("generate skipped" in n for n in result.notes)
