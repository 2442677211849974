"""What we need to know of a checkpoint, read from its Hugging Face folder and checked once.

Everything downstream (layers, KV layout, the engine's limits) reads a `ModelSpec`, never the
raw HF config, so unsupported features are refused here with a message naming them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from common.errors import ModelLoadError

# architecture -> (bias on q/k/v, bias on o, bias on the MLP), as each HF modeling file builds it.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ModelLoadError(f"dtype {name} is not supported; choose one of {sorted(_DTYPES)}")
        return name
    if name not in _DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_model_len: int  # longest sequence (prompt + output) this model serves
    dtype: torch.dtype  # dtype the weights are served in
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    hf_config: PretrainedConfig = field(repr=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_folder(cls, path: str | Path, dtype: str | torch.dtype | None = None) -> ModelSpec:
        """Read and validate `path/config.json`; `dtype` overrides the checkpoint's own."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder}: no config.json; expected a Hugging Face model folder")
        try:
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # transformers raises many types for one cause: a bad config
            raise ModelLoadError(f"{folder}/config.json: cannot be read: {exc}") from exc
        archs = list(getattr(cfg, "architectures", None) or [])
        supported = [a for a in archs if a in _ARCHITECTURES]
        if not supported:
            raise ModelLoadError(
                f"{folder}: architectures {archs} are not supported; supported: {sorted(_ARCHITECTURES)}"
            )
        arch = _ARCHITECTURES[supported[0]]
        _check_rope(cfg, folder)
        num_heads = cfg.num_attention_heads
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ModelLoadError(f"{folder}: num_attention_heads={num_heads} is not a multiple of {num_kv_heads=}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        checkpoint_dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
        return cls(
            path=folder,
            architecture=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            rms_norm_eps=cfg.rms_norm_eps,
            hidden_act=cfg.hidden_act,
            qkv_bias=arch == "qwen2" or (arch == "llama" and attention_bias),
            o_bias=arch == "llama" and attention_bias,
            mlp_bias=arch == "llama" and bool(getattr(cfg, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_model_len=_max_model_len(cfg, arch),
            dtype=parse_dtype(dtype if dtype is not None else checkpoint_dtype),
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_ids=_eos_token_ids(cfg, folder),
            hf_config=cfg,
        )


def _check_rope(cfg: PretrainedConfig, folder: Path) -> None:
    params: dict[str, Any] = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        # Dynamic NTK changes the frequencies with the sequence length, so a cached key would
        # need re-rotation; refuse rather than serve subtly wrong attention.
        raise ModelLoadError(f"{folder}: rope_type 'dynamic' is not supported")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{folder}: partial_rotary_factor != 1 is not supported")


def _max_model_len(cfg: PretrainedConfig, arch: str) -> int:
    """The context we serve exactly: sliding-window layers are not implemented, so we stop at the window."""
    limit = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    uses_window = arch == "mistral" or "sliding_attention" in (getattr(cfg, "layer_types", None) or [])
    if uses_window and window:
        limit = min(limit, int(window))
    return limit


def _eos_token_ids(cfg: PretrainedConfig, folder: Path) -> tuple[int, ...]:
    """generation_config.json wins over config.json, as in `transformers.generate`."""
    eos: Any = getattr(cfg, "eos_token_id", None)
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
