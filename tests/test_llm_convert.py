"""GGUF -> Hugging Face conversion on tiny GGUF files written with the gguf writer, and the folders the
LLM tools refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_fixtures import byte_level_tokenizer, save_tiny_llama, tiny_llama, vocabulary, write_llama_gguf
from primerge.cli.main import main
from primerge.util.errors import InputError
from primerge.evaluation.llm.convert import check_causal_lm, convert_gguf, resolve_base

gguf = pytest.importorskip("gguf")


def test_gguf_round_trips_tensors_config_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama(seed=1)
    q8 = "blk.0.ffn_up.weight"
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, {q8: gguf.GGMLQuantizationType.Q8_0})
    logs = []
    folder = convert_gguf(path, tmp_path / "cache", log=logs.append)
    assert len(logs) == 1 and folder.parent == tmp_path / "cache" / "llm"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (2, 4, 2)
    converted = AutoModelForCausalLM.from_pretrained(folder)
    original = model.state_dict()
    for name, tensor in converted.state_dict().items():
        expected = original[name]
        if name == "model.layers.0.mlp.up_proj.weight":  # stored as Q8_0: equals gguf's own dequantization
            w = expected.numpy()
            expected = torch.from_numpy(gguf.dequantize(gguf.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                                        gguf.GGMLQuantizationType.Q8_0).reshape(w.shape))
            assert not torch.equal(expected, original[name])
        assert torch.equal(tensor, expected), name  # Q/K un-permuted exactly, every other tensor bit-exact
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = byte_level_tokenizer()
    assert tokenizer.get_vocab() == reference.get_vocab() == {t: i for i, t in enumerate(vocabulary()[0])}
    for text in ("the positive note", " a nose, at it?\n"):
        assert tokenizer.encode(text) == reference.encode(text)
    assert convert_gguf(path, tmp_path / "cache", log=logs.append) == folder and len(logs) == 1  # cached


def test_gguf_without_quantization_gives_the_same_function(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=2, tie=False)
    folder = resolve_base(write_llama_gguf(tmp_path / "f32.gguf", model), tmp_path, log=lambda _: None)
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 80, 261, 40, 9]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False


def test_undequantizable_gguf_is_one_clear_error(tmp_path, capsys):
    model = tiny_llama()
    path = write_llama_gguf(tmp_path / "q81.gguf", model, {"blk.1.attn_v.weight": gguf.GGMLQuantizationType.Q8_1})
    with pytest.raises(InputError, match=r"tensor blk\.1\.attn_v\.weight is stored as Q8_1, which the gguf package "
                                         r"cannot dequantize"):
        convert_gguf(path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    code = main(["demo", "--suite", "llm", "--base", str(path), "--cache", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Q8_1" in err[0] and str(path) in err[0]


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + np.arange(64, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a readable GGUF file"):
        convert_gguf(path, tmp_path / "cache")
    with pytest.raises(InputError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "cache")


def test_folders_that_are_not_causal_lms_are_refused(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20)).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match=r"bert is not a causal language model \(its config.json says BertModel\)"):
        check_causal_lm(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        check_causal_lm(tmp_path / "empty")
    llama = save_tiny_llama(tmp_path / "llama")
    assert check_causal_lm(llama)["model_type"] == "llama"
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n{"text": "e f", "label": "x"}\n')
    code = main(["eval", str(tmp_path / "bert"), "--harness", "lm-eval", "--tasks", str(data), "--cache", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a causal language model" in err[0]
