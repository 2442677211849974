"""A Llama-family causal LM with attention supplied by the caller, layer by layer.

`forward` takes an `AttentionFn`, so the same model code serves prefill (causal attention over
new prompts), local decode (paged attention) and the decode instance's split between local and
offloaded requests; the model never knows where attention ran.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.model.layers import DecoderLayer, Linear, RMSNorm, RotaryEmbedding
from common.model.spec import ModelSpec
from kernels.backend import LinearFn

# (layer index, q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]) -> attention output [T, H, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=spec.dtype)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.dtype)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=spec.dtype)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(spec)
        self.scale = spec.head_dim**-0.5

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """The layers, typed (nn.ModuleList erases the element type)."""
        return list(self.layers)  # type: ignore[arg-type]

    def use_linear_kernel(self, kernel: LinearFn | None) -> None:
        """Route every linear layer to `kernel` (a backend's `linear`; None: F.linear). float32
        only, the C++ kernel's one type; the embedding and attention are not linear layers."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = kernel if self.spec.dtype == torch.float32 else None

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [T], int64
        positions: torch.Tensor,  # [T], int64
        attention: AttentionFn,
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        hidden = self.embed_tokens(token_ids)
        cos, sin = self.rotary(positions, hidden.dtype)
        for index, layer in enumerate(self.decoder_layers):
            q, k, v = layer.pre_attention(hidden, cos, sin)
            hidden = layer.post_attention(attention(index, q, k, v), hidden)
        normed: torch.Tensor = self.norm(hidden)
        return normed

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32 (sampling always works in float32)."""
        return self.lm_head(hidden).float()
