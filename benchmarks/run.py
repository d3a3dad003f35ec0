"""The benchmark suite: `python benchmarks/run.py --quick` (see --help; the tables live in benchmarks/suite.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch and numpy load their thread pools. On a CPU shared with other processes, threads that spin while
# waiting for work steal the cores the working threads need: OpenMP's default active wait made training steps
# 2-4× slower, and the two OpenBLAS pools numpy and scipy each bring made scipy's sqrtm 8× and eigvalsh 35×
# slower (2-core machine at load 3-4). Passive OpenMP waiting and a short OpenBLAS spin (2^4 cycles) cost little
# on an idle machine. Settings already in the environment win.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
