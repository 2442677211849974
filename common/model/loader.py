"""Checkpoint folder -> `CausalLM`: safetensors only (no pickle), sharded or not.

Each HF tensor name maps to one of our parameters, and for packed projections to a row range
of it; every parameter must be filled exactly once, every checkpoint tensor must be used, and
shapes must agree, or the load fails naming the tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from common import hugepages
from common.errors import ModelLoadError
from common.model.layers import RotaryEmbedding
from common.model.model import CausalLM
from common.model.spec import ModelSpec

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files (pickled .bin checkpoints are not loaded)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{folder}: shard(s) named in the index are missing: {missing}")
    return files


def _target(spec: ModelSpec, name: str) -> tuple[str, int, int] | None:
    """HF tensor name -> (our parameter name, first row, row count); None for tensors we skip."""
    if _IGNORED.search(name):
        return None
    if name == "lm_head.weight" and spec.tie_word_embeddings:
        return None
    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return name.removeprefix("model."), 0, -1
    match = _LAYER.match(name)
    if match is None:
        raise ModelLoadError(f"{spec.path}: unexpected tensor {name!r}")
    layer, rest = match.groups()
    prefix = f"layers.{layer}."
    q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
    packed = {
        "self_attn.q_proj": ("qkv_proj", 0, q),
        "self_attn.k_proj": ("qkv_proj", q, kv),
        "self_attn.v_proj": ("qkv_proj", q + kv, kv),
        "mlp.gate_proj": ("gate_up_proj", 0, inter),
        "mlp.up_proj": ("gate_up_proj", inter, inter),
    }
    module, _, kind = rest.rpartition(".")
    if module in packed:
        ours, start, rows = packed[module]
        return f"{prefix}{ours}.{kind}", start, rows
    renamed = {"self_attn.o_proj": "o_proj", "mlp.down_proj": "down_proj"}.get(module, module)
    return f"{prefix}{renamed}.{kind}", 0, -1


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> CausalLM:
    """Build the model on `device` in `spec.dtype` and fill it from the checkpoint."""
    with torch.device("meta"):
        model = CausalLM(spec)
    model.to_empty(device=device)
    if spec.tie_word_embeddings:  # to_empty materialises each module's tensor on its own
        model.lm_head.weight = model.embed_tokens.weight
    hugepages.rehome(model)  # every step streams all weights: huge pages on a CPU (common/hugepages.py)
    model.rotary = RotaryEmbedding(spec).to(device)  # computed, not stored in checkpoints
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    for path in checkpoint_files(spec.path):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118  # safe_open is not a mapping
                target = _target(spec, name)
                if target is None:
                    continue
                ours, start, rows = target
                if ours not in params:
                    raise ModelLoadError(f"{spec.path}: tensor {name!r} has no place in a {spec.architecture} model")
                tensor = f.get_tensor(name)
                param = params[ours].data
                dest = param if rows == -1 else param.narrow(0, start, rows)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ModelLoadError(
                        f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor.to(spec.dtype))
                filled[ours] = filled.get(ours, 0) + dest.numel()
    missing = sorted(n for n, p in params.items() if filled.get(n, 0) != p.numel())
    if missing:
        raise ModelLoadError(f"{spec.path}: checkpoint lacks weights for {missing[:8]}")
    model.eval()
    return model
