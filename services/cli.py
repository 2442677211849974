"""The `adrenaline` command.

adrenaline model make-tiny DIR      write the embedded default model (deterministic, offline)
adrenaline generate --model DIR     run prompts through the single-process engine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.errors import AdrenalineError
from common.settings import size


def default_model_dir() -> Path:
    """Where the embedded default model lives: $ADRENALINE_CACHE/models/default (~/.cache/adrenaline)."""
    cache = Path(os.environ.get("ADRENALINE_CACHE", Path.home() / ".cache" / "adrenaline"))
    return cache / "models" / "default"


def _up(args: argparse.Namespace) -> int:
    from common.config import parse_offload_ratio
    from common.model.tiny import make_tiny
    from services.local_cluster import LocalCluster
    from services.up import parse_pin, parse_roles, parse_scale, run_until_signalled

    model = Path(args.model) if args.model else default_model_dir()
    if args.model is None and not (model / "config.json").is_file():
        print(f"making the embedded default model in {model}", flush=True)
        make_tiny(model, "llama", preset="default")
    try:
        scale, pin, roles = parse_scale(args.scale), parse_pin(args.pin), parse_roles(args.roles)
        if args.secrets and not args.nats_url:
            raise ValueError("--secrets is for joining a NATS with --nats-url (alone, up makes its own passwords)")
    except ValueError as exc:
        print(f"adrenaline up: error: {exc}", file=sys.stderr)
        return 2
    try:
        parse_offload_ratio(args.offload_ratio)
    except ValueError as exc:
        print(f"adrenaline up: error: {exc}", file=sys.stderr)
        return 2
    cluster = LocalCluster(
        model,
        port=args.port,
        host=args.host,
        scale=scale,
        pin=pin,
        offload_ratio=args.offload_ratio,
        kv_cache_bytes=args.kv_cache_bytes,
        nats_url=args.nats_url,
        secrets=Path(args.secrets) if args.secrets else None,
        roles=roles,
        name=args.name,
        metrics_host=args.metrics_host,
        ucx_net_devices=args.ucx_net_devices,
        prefill_nice=args.prefill_nice,
    )
    return run_until_signalled(cluster)


def _make_tiny(args: argparse.Namespace) -> int:
    from common.model.tiny import make_tiny

    path = make_tiny(args.dir, arch=args.arch, preset=args.preset, seed=args.seed)
    print(f"wrote a {args.preset} {args.arch} model to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from common.config import EngineConfig
    from common.engine import Engine
    from common.sampling import SamplingParams

    engine = Engine.from_folder(args.model, EngineConfig(device=args.device))
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts = [tokenizer(p).input_ids for p in args.prompt]
    start = time.perf_counter()
    requests = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for text, request in zip(args.prompt, requests, strict=True):
        completion = tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        print(f"{text!r} -> {completion!r} ({len(request.output_token_ids)} tokens, {request.finish_reason})")
    total = sum(len(r.output_token_ids) for r in requests)
    print(f"{total} tokens in {elapsed:.2f} s")
    return 0


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from common.bus import NatsAuth
    from common.nats_auth import read_credentials
    from services.status import run

    if args.credentials:
        user, password = read_credentials(Path(args.credentials))
    else:
        user, password = os.environ.get("ADRENALINE_NATS_USER", ""), os.environ.get("ADRENALINE_NATS_PASSWORD", "")
    try:
        return asyncio.run(run(args.nats_url, args.prefix, args.watch, NatsAuth(user, password)))
    except KeyboardInterrupt:
        return 0


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.serve import main as bench_main

    bench_main(args.bench_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adrenaline", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the cluster as local processes and serve the OpenAI API")
    up.add_argument("--model", default=None, help="a local HF folder; default: the embedded default model")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--scale", action="append", default=[], metavar="ROLE=N", help="prefill=N or decode=N")
    up.add_argument("--pin", action="append", default=[], metavar="ROLE=CPUS", help="e.g. decode=0 prefill=1")
    up.add_argument(
        "--prefill-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="N",
        help="run a prefill instance that has an executor beside it N nicer (0-19; docs/services.md)",
    )

    up.add_argument(
        "--kv-cache-bytes",
        type=size,
        default=256 * 2**20,
        help="KV budget of every prefill, decode and executor process, e.g. 256MiB (compose.yaml's are for GPUs)",
    )
    several = up.add_argument_group("one host of several (docs/deploy.md)")
    several.add_argument(
        "--nats-url", default="", help="join this NATS (comma-separated nodes) instead of starting one"
    )
    several.add_argument("--secrets", default="", help="folder of per-role NATS passwords (make compose-secrets)")
    several.add_argument(
        "--roles",
        default="",
        help="comma-separated roles to run here (scheduler,prefill,attention-executor,decode,gateway)",
    )
    several.add_argument("--name", default="", help="this host's name in instance ids, unique in the cluster")
    several.add_argument("--metrics-host", default="127.0.0.1", help="address the instances' /metrics bind")
    several.add_argument("--ucx-net-devices", default="lo", help="devices UCX uses to meet other hosts, e.g. eth0")
    up.add_argument(
        "--offload-ratio",
        default="auto",
        help="'auto' (load-aware, the default) or the fixed share of requests whose decode attention and KV "
        "go to attention executors; 0 is plain PD",
    )
    up.set_defaults(func=_up)

    model = commands.add_parser("model", help="model folders").add_subparsers(dest="model_command", required=True)
    tiny = model.add_parser("make-tiny", help="write the embedded default model (random weights, BPE tokenizer)")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=("llama", "mistral", "qwen2"), default="llama")
    tiny.add_argument("--preset", choices=("default", "memory-bound", "test"), default="default")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)

    gen = commands.add_parser("generate", help="generate with the single-process engine")
    gen.add_argument("--model", required=True, help="a local Hugging Face model folder")
    gen.add_argument("--prompt", action="append", required=True, help="may be given several times")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=_generate)

    status = commands.add_parser("status", help="what a running cluster is doing: instances, KV, queues")
    status.add_argument(
        "--nats-url",
        default=os.environ.get("ADRENALINE_NATS_URL", "nats://127.0.0.1:4222"),
        help="the cluster's NATS (adrenaline up prints it); default $ADRENALINE_NATS_URL or nats://127.0.0.1:4222",
    )
    status.add_argument("--prefix", default=os.environ.get("ADRENALINE_SUBJECTS_PREFIX", "adrenaline"))
    status.add_argument(
        "--credentials",
        default="",
        help="a NATS credentials file (adrenaline up prints it); default $ADRENALINE_NATS_USER/_PASSWORD",
    )
    status.add_argument("--watch", action="store_true", help="redraw every second (on a terminal) until Ctrl-C")
    status.set_defaults(func=_status)

    bench = commands.add_parser("bench", help="serving benchmark: offload ratios side by side", prefix_chars="\0")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of benchmarks/serve.py (bench --help)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except AdrenalineError as exc:
        print(f"adrenaline: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
