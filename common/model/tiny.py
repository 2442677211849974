"""The embedded default model: a small Llama-family checkpoint made here, deterministically.

Weights are random (fixed seed) and the tokenizer is a byte-level BPE trained offline on a
corpus generated from a fixed seed, so every machine makes byte-identical folders with no
download. The text it writes is nonsense; every code path that serves it is real. Tests make
variants (Mistral- and Qwen2-shaped, GQA and MHA, tied embeddings, sharded weights).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Shapes: "test" keeps the suite fast, "default" is what `make run` serves, "memory-bound" is a
# model whose decode step, like an LLM's on a GPU, is dominated by reading its weights at the batch
# sizes a small KV cache allows (95 M parameters, 380 MB float32: 26 ms a step at batch 1, 69 ms at
# batch 12 on one core here), the regime where offloading attention pays (docs/benchmarks.md).
PRESETS: dict[str, dict[str, Any]] = {
    "test": {
        "vocab": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "default": {
        "vocab": 2048,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
    },
    "memory-bound": {
        "vocab": 2048,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
    },
}
ARCHS = ("llama", "mistral", "qwen2")

_WORDS = [
    "adrenaline",
    "attention",
    "batch",
    "block",
    "cache",
    "decode",
    "executor",
    "gateway",
    "kernel",
    "layer",
    "memory",
    "prefill",
    "request",
    "scheduler",
    "stream",
    "token",
    "throughput",
    "latency",
    "offload",
    "bandwidth",
    "capacity",
    "engine",
    "model",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "from",
    "this",
    "be",
    "are",
    "or",
    "an",
    "which",
]


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]) + f" {rng.randint(0, 999)}")
    return out


def make_tokenizer(vocab: int, seed: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(arch: str, preset: str = "test", **overrides: Any) -> PretrainedConfig:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    shape = dict(PRESETS[preset])
    vocab = shape.pop("vocab")
    heads = shape["num_attention_heads"]
    common: dict[str, Any] = {
        **shape,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "dtype": "float32",
    }
    config: PretrainedConfig
    if arch == "llama":  # GQA, untied embeddings
        config = LlamaConfig(**{**common, "num_key_value_heads": heads // 2, "tie_word_embeddings": False})
    elif arch == "mistral":  # GQA with a head_dim that is not hidden/heads
        head_dim = 2 * shape["hidden_size"] // heads
        config = MistralConfig(
            **{**common, "num_key_value_heads": heads // 4 or 1, "head_dim": head_dim, "sliding_window": None}
        )
    else:  # qwen2: q/k/v bias, MHA, tied embeddings
        config = Qwen2Config(**{**common, "num_key_value_heads": heads, "tie_word_embeddings": True})
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_tiny(
    out_dir: str | Path,
    arch: str = "llama",
    preset: str = "test",
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a complete HF model folder to `out_dir` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(PRESETS[preset]["vocab"], seed)
    config = make_config(arch, preset, **overrides)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                # Wider than HF's 0.02 so logits are peaked and greedy argmax has clear margins.
                fan_in = param.shape[-1] if name.endswith("proj.weight") else 1
                std = 1.0 / fan_in**0.5 if fan_in > 1 else 1.0
                param.copy_(std * torch.randn(param.shape, generator=gen))
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    with _progress_bars_on_a_terminal_only():
        model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def _progress_bars_on_a_terminal_only() -> Iterator[None]:
    """transformers draws a bar while it writes the weights; in a log file or CI its redraws are noise."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
