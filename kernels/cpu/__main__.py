"""`python -m kernels.cpu`: compile the C++ CPU kernels now (the Makefile runs this after installing)."""

from __future__ import annotations

import sys
import time

from kernels import cpu


def main() -> None:
    start = time.perf_counter()
    try:
        cpu.load(verbose="-v" in sys.argv)
    except Exception as exc:  # no compiler, missing headers: say so, serving falls back to torch
        print(f"CPU kernels not built ({exc}); the torch reference attention will be used", file=sys.stderr)
        sys.exit(1)
    print(f"CPU kernels ready ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
