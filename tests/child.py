"""A stand-in service for supervisor tests: `python -m tests.child exit CODE` or `python -m tests.child sleep`."""

from __future__ import annotations

import sys
import time

if __name__ == "__main__":
    if sys.argv[1] == "exit":
        sys.exit(int(sys.argv[2]))
    time.sleep(3600)
