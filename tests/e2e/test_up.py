"""`adrenaline up` itself: the command an operator runs, started and stopped like one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from common.natsd import free_port


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.timeout(180)
def test_up_serves_until_sigint_and_leaves_no_process_behind(llama_dir: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "services.cli", "up", "--model", str(llama_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "serving the OpenAI API" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "adrenaline up exited before serving"
            assert time.monotonic() < deadline, "adrenaline up never printed its URL"
        assert f"http://127.0.0.1:{port}/v1" in line
        children = _children_of(proc.pid)
        assert len(children) >= 5  # nats-server, scheduler, prefill, decode, gateway
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(model=llama_dir.name, prompt="hello", max_tokens=5, temperature=0)
        assert completion.usage is not None and completion.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]
        assert not alive, f"processes left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "gone"
