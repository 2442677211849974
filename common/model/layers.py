"""The decoder's building blocks, each computing exactly what its transformers twin computes.

Matching transformers op for op (float32 RMSNorm, cos/sin cast to the activation dtype, the
same residual order) is what keeps greedy output identical to `generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from common.model.spec import ModelSpec
from kernels.backend import LinearFn


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose products may go to a backend's
    faster kernel (`kernel`, set by `CausalLM.use_linear_kernel`); F.linear otherwise."""

    kernel: LinearFn | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dim() == 2:
            return self.kernel(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables per position; frequencies come from transformers' own RoPE initialisers."""

    inv_freq: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        cfg = spec.hf_config
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        with torch.device("cpu"):  # real numbers even when the model is being built on "meta"
            inv_freq, scaling = self._frequencies(cfg, spec.head_dim, rope_type)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = float(scaling)

    @staticmethod
    def _frequencies(cfg: PretrainedConfig, dim: int, rope_type: str) -> tuple[torch.Tensor, float]:
        if rope_type == "default":
            base = cfg.rope_parameters["rope_theta"]
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
        return inv_freq, float(scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim] in `dtype`."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class DecoderLayer(nn.Module):
    """One transformer block, cut where attention sits so that attention can run elsewhere.

    `pre_attention` and `post_attention` run on the decode instance for the whole batch;
    the attention between them may run locally or on an attention executor per request.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        dt = spec.dtype
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dt)
        # q, k and v packed in one projection (rows in that order), as the loader fills it.
        self.qkv_proj = Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.qkv_bias, dtype=dt)
        self.o_proj = Linear(spec.q_size, spec.hidden_size, bias=spec.o_bias, dtype=dt)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dt)
        # gate and up packed in one projection (gate rows first).
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias, dtype=dt)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias, dtype=dt)
        self.act = ACT2FN[spec.hidden_act]
        self.q_size, self.kv_size = spec.q_size, spec.kv_size

    def pre_attention(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, head_dim]
        sin: torch.Tensor,  # [T, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm, QKV projection and RoPE -> q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(hidden))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)
        return q, k, v.view(num_tokens, self.num_kv_heads, self.head_dim)

    def post_attention(
        self,
        attn_out: torch.Tensor,  # [T, H, D]
        residual: torch.Tensor,  # [T, hidden]: this layer's input
    ) -> torch.Tensor:  # [T, hidden]
        """O projection, residual, norm, MLP, residual."""
        hidden = residual + self.o_proj(attn_out.reshape(attn_out.shape[0], self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden)).chunk(2, dim=-1)
        return hidden + self.down_proj(self.act(gate) * up)
