"""scale.vllm_sync.weight_stream: on one process exactly the tensors `save_pretrained` writes (the files vLLM loads
at start, so the names and shapes its loader takes), tied weights once; under LoRA the merged weights under base
names, and the model unchanged afterwards; under FSDP2 and ZeRO-3 on 2 CPU processes, the unsharded checkpoint."""

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


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_streams_equal_the_unsharded_checkpoint(engine, tmp_path):
    """Under FSDP2 and ZeRO-3 on 2 CPU processes (tests/scale/vllm_sync_worker.py: really sharded), with and without
    LoRA: the streamed names, shapes and values are the unsharded model's checkpoint (merged under LoRA), exactly:
    gathering moves values, it does not compute them."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(root / "tests" / "scale" / "vllm_sync_worker.py"), engine, str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=root,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for case in (engine, f"{engine}-lora"):
        got, want = load_file(tmp_path / f"{case}.safetensors"), load_file(tmp_path / f"{case}.ref.safetensors")
        assert set(got) == set(want) and len(got) == 26, case
        for name, t in want.items():
            assert got[name].shape == t.shape and torch.equal(got[name], t), (case, name)
