"""scale.vllm_sync.weight_stream on one process: exactly the tensors `save_pretrained` writes (the files vLLM loads
at start, so the names and shapes its loader takes), tied weights once; under LoRA the merged weights under base
names, and the model unchanged afterwards. (The sharded engines: tests/scale/test_engines.py.)"""

import copy

import pytest
import torch
from safetensors.torch import load_file

from scale.vllm_sync import weight_stream
from toy.tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def model():
    return make_model(make_tokenizer(), hidden_size=32, intermediate_size=64).double()


def _saved(model, tmp_path) -> dict[str, torch.Tensor]:
    model.save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def test_stream_is_the_saved_checkpoint(model, tmp_path):
    saved = _saved(model, tmp_path)
    streamed = {n: t.clone() for n, t in weight_stream(model)}
    assert list(streamed) == list(dict(model.named_parameters()))          # one pass, each tensor once
    assert set(streamed) == set(saved) and "lm_head.weight" not in streamed  # tied head: sent once, as saved
    for name, t in saved.items():
        assert streamed[name].shape == t.shape and torch.equal(streamed[name], t), name


def test_lora_streams_merged_weights_under_base_names_and_unmerges(model, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    merged = _saved(copy.deepcopy(peft).merge_and_unload(), tmp_path)     # PEFT's own merge, saved
    streamed = {n: t.clone() for n, t in weight_stream(peft)}
    assert set(streamed) == set(merged)
    for name, t in merged.items():
        assert torch.allclose(streamed[name], t, rtol=0, atol=1e-12), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(streamed[q], model.state_dict()[q])           # the adapter really changed it
    after = dict(peft.named_parameters())
    assert all(torch.allclose(after[n], b, rtol=0, atol=1e-12) for n, b in before.items())   # unmerged again
