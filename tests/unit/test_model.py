"""Checkpoint loading and the forward pass against transformers itself, on the same folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from common.block_manager import BlockManager
from common.errors import ModelLoadError
from common.kv_pool import KVLayout, KVPool
from common.model.loader import load_model
from common.model.spec import ModelSpec
from common.model.tiny import ARCHS, make_tiny
from common.paged_attention import PagedAttention, decode_metadata, prefill_metadata
from kernels.backend import get_backend

PROMPT_LENS = [1, 5, 16, 23, 40]


def _prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _paged_prefill_then_decode(spec: ModelSpec, prompts: list[list[int]], next_tokens: list[int], block_size: int = 4):
    """Our model through the paged path: a packed prefill, then one decode step per prompt."""
    model = load_model(spec)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, spec.dtype)
    blocks = BlockManager(64, block_size)
    attn = PagedAttention(get_backend("torch"), KVPool(layout, 64, torch.device("cpu")), model.scale)
    owners = list(range(len(prompts)))
    lens = [len(p) for p in prompts]
    for owner, n in zip(owners, lens, strict=True):
        blocks.allocate(owner, n)
    meta = prefill_metadata(blocks, owners, lens, torch.device("cpu"))
    tokens = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    hidden = model(tokens, positions, attn.prefill_fn(meta))
    prefill_logits = model.logits(hidden[meta.cu_seqlens[1:].long() - 1])
    for owner, n in zip(owners, lens, strict=True):
        blocks.append(owner, n + 1)
    dmeta = decode_metadata(blocks, owners, [n + 1 for n in lens], torch.device("cpu"))
    decode_logits = model.logits(model(torch.tensor(next_tokens), torch.tensor(lens), attn.decode_fn(dmeta)))
    return prefill_logits, decode_logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_match_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    folder = tiny_models[arch]
    spec = ModelSpec.from_folder(folder)
    prompts = _prompts(spec.vocab_size, PROMPT_LENS)
    next_tokens = [7 + i for i in range(len(prompts))]
    prefill_logits, decode_logits = _paged_prefill_then_decode(spec, prompts, next_tokens)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ref = hf(torch.tensor([[*prompt, next_tokens[i]]])).logits[0]
            assert _rel_err(prefill_logits[i], ref[-2]) < 1e-4
            assert _rel_err(decode_logits[i], ref[-1]) < 1e-4


def test_sharded_checkpoint_and_llama3_rope_scaling_load_exactly(tmp_path: Path) -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 50000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = make_tiny(tmp_path / "sharded", "llama", max_shard_size="100KB", rope_parameters=rope)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    spec = ModelSpec.from_folder(folder)
    prompts = _prompts(spec.vocab_size, [50, 3])
    prefill_logits, _ = _paged_prefill_then_decode(spec, prompts, [5, 6])
    hf = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            assert _rel_err(prefill_logits[i], hf(torch.tensor([prompt])).logits[0, -1]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_load_in_the_dtype_asked_for(llama_dir: Path, dtype: torch.dtype) -> None:
    model = load_model(ModelSpec.from_folder(llama_dir, dtype=dtype))
    assert {p.dtype for p in model.parameters()} == {dtype}
    hf_weight = load_file(str(llama_dir / "model.safetensors"))["model.layers.0.self_attn.k_proj.weight"]
    ours = model.layers[0].qkv_proj.weight[model.spec.q_size : model.spec.q_size + model.spec.kv_size]
    assert torch.equal(ours, hf_weight.to(dtype))


def test_tied_embeddings_share_one_tensor(tiny_models: dict[str, Path]) -> None:
    model = load_model(ModelSpec.from_folder(tiny_models["qwen2"]))
    assert model.spec.tie_word_embeddings and model.spec.qkv_bias
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_or_weights_is_a_clear_error(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        ModelSpec.from_folder(tmp_path / "nowhere")
    folder = _copy(llama_dir, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(ModelSpec.from_folder(folder))


def test_unsupported_architecture_is_named(tmp_path: Path, llama_dir: Path) -> None:
    folder = _copy(llama_dir, tmp_path / "gpt2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="GPTNeoXForCausalLM"):
        ModelSpec.from_folder(folder)


def test_dynamic_rope_is_refused(tmp_path: Path, llama_dir: Path) -> None:
    folder = _copy(llama_dir, tmp_path / "dyn")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="dynamic"):
        ModelSpec.from_folder(folder)


def test_shape_mismatch_and_missing_tensor_are_named(tmp_path: Path, llama_dir: Path) -> None:
    folder = _copy(llama_dir, tmp_path / "bad")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        load_model(ModelSpec.from_folder(folder))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"layers\.1\.gate_up_proj\.weight"):
        load_model(ModelSpec.from_folder(folder))


def test_unexpected_tensor_is_named(tmp_path: Path, llama_dir: Path) -> None:
    folder = _copy(llama_dir, tmp_path / "extra")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(4)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="q_norm"):
        load_model(ModelSpec.from_folder(folder))
