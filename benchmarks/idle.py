"""What an idle cluster costs: CPU used by every process of `adrenaline up` while nothing is asked.

Starts the cluster `adrenaline up` runs (its defaults, or `--offload-ratio`), sends a burst of
completions so that every path has moved data (NATS, UCX hand-offs, offloaded steps when the
ratio asks for them), waits for it to settle, then reads each process's CPU time from
`/proc/<pid>/stat` over `--seconds` of silence. Reported as a share of one core.

    python -m benchmarks.idle [--model DIR] [--offload-ratio auto|R] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.model.tiny import make_tiny
from common.natsd import free_port
from services.local_cluster import LocalCluster


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def traffic(url: str, model: str, requests: int) -> int:
    """`requests` completions of 32 tokens, 16 at a time; returns the tokens generated."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def one(i: int) -> int:
        completion = client.completions.create(model=model, prompt="hello " * (5 + i), max_tokens=32, temperature=0)
        return completion.usage.completion_tokens if completion.usage else 0

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(one, range(requests)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF folder; default: the embedded default model")
    parser.add_argument("--offload-ratio", default="auto")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny(Path(tmp) / "default", "llama", preset="default")
        cluster = LocalCluster(model=model, port=free_port(), offload_ratio=args.offload_ratio)
        try:
            cluster.start()
            cluster.wait_ready()
            tokens = traffic(cluster.url, model.name, args.requests)
            time.sleep(3.0)  # let hand-offs, releases and the last heartbeats settle
            processes = {child.name: child.process.pid for child in cluster.group.children}
            if cluster.nats is not None:
                processes["nats-server"] = cluster.nats.process.pid
            before = {name: cpu_seconds(pid) for name, pid in processes.items()}
            time.sleep(args.seconds)
            used = {name: cpu_seconds(pid) - before[name] for name, pid in processes.items()}
        finally:
            cluster.stop()
    total = sum(used.values())
    print(
        f"after {args.requests} requests ({tokens} tokens), offload ratio {args.offload_ratio}, "
        f"idle {args.seconds:g} s:"
    )
    for name, seconds in sorted(used.items()):
        print(f"  {name:<22} {100 * seconds / args.seconds:5.2f}% of one core")
    print(f"  {'total':<22} {100 * total / args.seconds:5.2f}% of one core")


if __name__ == "__main__":
    main()
