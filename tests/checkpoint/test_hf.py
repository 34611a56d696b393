"""Hugging Face round trip: a tiny random MixtralForCausalLM made with transformers -> megamoe checkpoint -> the
same logits in megamoe (fp32, to 1e-5) -> back to Hugging Face -> every tensor bitwise equal, and transformers
loads it. Also dense Mistral, and the sharded safetensors index."""

import json

import pytest
import torch

from megamoe.checkpoint.checkpointer import CheckpointConfig, check_model_shapes, find_checkpoint, load_checkpoint
from megamoe.checkpoint.convert import hf_to_megamoe, megamoe_to_hf
from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (dev extra)")
SIZES = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6)


def _hf_model(kind):
    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.MistralConfig(**SIZES, sliding_window=None, rope_theta=1e4)
        model = transformers.MistralForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _megamoe_logits(root, model_config, ids):
    found = find_checkpoint(CheckpointConfig(load=str(root)))
    check_model_shapes(found, model_config)
    mesh = ParallelMesh(ParallelConfig(world_size=1), standalone=True)
    model = GPTModel(model_config, mesh, seed=99).eval()
    load_checkpoint(found, [model], None, mesh)
    with torch.no_grad():
        return model(ids)[..., :model_config.vocab_size]


def _tensors(directory):
    from safetensors import safe_open

    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("kind, shard_size", [("mixtral", None), ("mixtral", "20KB"), ("mistral", None)])
def test_round_trip(tmp_path, kind, shard_size):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard_size} if shard_size else {}))
    path, model_config = hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "megamoe"), progress=False)
    assert (model_config.moe is not None) == (kind == "mixtral")

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = _megamoe_logits(tmp_path / "megamoe", model_config, ids)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5

    files = megamoe_to_hf(path, str(tmp_path / "back"), max_shard_bytes=20_000 if shard_size else 2 ** 30,
                          progress=False)
    assert ("model.safetensors.index.json" in files) == bool(shard_size)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    reloaded = type(hf).from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_unsupported_models_are_refused(tmp_path):
    hf = _hf_model("mistral")
    hf.save_pretrained(tmp_path / "hf")
    config = json.load(open(tmp_path / "hf" / "config.json"))
    config.update(sliding_window=16, hidden_act="gelu")
    json.dump(config, open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(ValueError, match="sliding-window attention .*\n.*hidden_act 'gelu'"):
        hf_to_megamoe(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        hf_to_megamoe(str(tmp_path / "nothing"), str(tmp_path / "out"), progress=False)


def test_convert_tool_round_trip_and_flags(tmp_path):
    import subprocess
    import sys

    hf = _hf_model("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    tool = ["tools/checkpoint/convert.py", "--no-progress"]
    out = subprocess.run([sys.executable, *tool, "--loader", "mixtral_hf", "--saver", "mcore", "--load-dir",
                          str(tmp_path / "hf"), "--save-dir", str(tmp_path / "ckpt"), "--target-expert-parallel-size",
                          "3"], capture_output=True, text=True)
    assert out.returncode == 2 and "--num-experts 4" in out.stderr  # 4 experts do not split over ep 3
    out = subprocess.run([sys.executable, *tool, "--loader", "hf", "--saver", "megamoe", "--load-dir",
                          str(tmp_path / "hf"), "--save-dir", str(tmp_path / "ckpt"), "--target-expert-parallel-size",
                          "2", "--target-tensor-parallel-size", "2"], capture_output=True, text=True, check=True)
    assert "--num-experts 4 --moe-router-topk 2" in out.stdout
    subprocess.run([sys.executable, *tool, "--loader", "megamoe", "--saver", "hf", "--load-dir", str(tmp_path / "ckpt"),
                    "--ckpt-step", "0", "--save-dir", str(tmp_path / "back"), "--dtype", "bf16"], check=True,
                   capture_output=True)
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert all(torch.equal(back[k], t.to(torch.bfloat16)) for k, t in original.items())
