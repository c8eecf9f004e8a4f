"""``python -m flash_module.bench``: the attention benchmark CLI, kept here as a thin shim.

The benchmark machinery lives in ``benchmarks/bench.py`` of the source repository (run it as
``python benchmarks/bench.py --help``); it is not part of the installed package.  This module finds that
file next to the package in a source checkout and runs its ``main()`` with the command-line arguments.
An installed wheel has no ``benchmarks/``: it then exits with a message saying so.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"

if __name__ == "__main__":
    if not BENCH_SCRIPT.is_file():
        sys.exit(f"python -m flash_module.bench: {BENCH_SCRIPT} not found. The benchmark is not part of an "
                 "installed flash_module; run `python benchmarks/bench.py` from a clone of the repository.")
    runpy.run_path(str(BENCH_SCRIPT), run_name="__main__")  # its `if __name__ == "__main__"` runs main()
