"""`python -m services.decode`: one decode instance."""

from __future__ import annotations

import sys

from services.decode.service import DecodeService
from services.runtime import run_engine_instance

if __name__ == "__main__":
    run_engine_instance(sys.argv[1:], "decode", DecodeService)
