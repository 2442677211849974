from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from common.model.tiny import make_tiny


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_make_tiny_is_deterministic_and_transformers_loads_it(tmp_path: Path) -> None:
    a = make_tiny(tmp_path / "a", "llama")
    b = make_tiny(tmp_path / "b", "llama")
    assert _digest(a) == _digest(b)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(_digest(a))
    model = AutoModelForCausalLM.from_pretrained(a)
    tokenizer = AutoTokenizer.from_pretrained(a)
    ids = tokenizer("the decode batch").input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) > 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the decode batch"
    assert max(ids) < model.config.vocab_size
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>hi\n<|assistant|>"


def test_cli_makes_a_model_and_generates(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "services.cli"]
    folder = tmp_path / "m"
    made = subprocess.run(
        [*cli, "model", "make-tiny", str(folder), "--preset", "test"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote a test llama model" in made.stdout
    assert "Writing model shards" not in made.stderr  # transformers' progress bar: a terminal's only
    run = subprocess.run(
        [
            *cli,
            "generate",
            "--model",
            str(folder),
            "--prompt",
            "hello",
            "--prompt",
            "batch",
            "--max-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = run.stdout.splitlines()
    assert lines[0].startswith("'hello' -> ") and "(5 tokens, length)" in lines[0]
    assert lines[1].startswith("'batch' -> ")
    assert lines[2].startswith("10 tokens in ")


def test_cli_reports_a_bad_model_folder_without_a_traceback(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", "--model", str(tmp_path), "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "no config.json" in run.stderr and "Traceback" not in run.stderr
