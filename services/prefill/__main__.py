"""`python -m services.prefill`: one prefill instance."""

from __future__ import annotations

import sys

from services.prefill.service import PrefillService
from services.runtime import run_engine_instance

if __name__ == "__main__":
    run_engine_instance(sys.argv[1:], "prefill", PrefillService)
