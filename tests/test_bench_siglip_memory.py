"""benchmarks/siglip_memory.py's smoke form: the sigmoid loss's peak memory per rank grows with the
global batch as local × global (the same bytes per pair at 2 and 4 ranks), where one process
holding the whole global batch grows with its square."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # gloo ranks in child processes
def test_peak_memory_per_rank_is_linear_in_the_global_batch():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "siglip_memory.py", "--smoke"], cwd=ROOT / "benchmarks", env=env,
                          capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| (\d+) × (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [(int(g), int(r)) for g, r, *_ in rows] == [(64, 2), (128, 4)]
    (_, _, _, peak2, pair2, one2), (_, _, _, peak4, pair4, one4) = rows
    assert abs(float(pair4) / float(pair2) - 1) < 0.25  # O(local × global): bytes per pair stay put
    assert float(one4) / float(one2) > 3  # O(global²) for one process holding the global batch
