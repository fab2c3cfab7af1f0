"""A DataLoader worker that dies while the loader ends (a native library aborting at its exit,
as one did at the end of a 1,123-step run): the run it fed has finished, so it ends with its
checkpoint, exit status 0 and a warning that says what happened, not with the loader's
"worker killed by signal" error. The worker here aborts in its own exit handlers, which run only
once the loader has told it to stop."""
from __future__ import annotations

import subprocess

import pytest

from conftest import HANG
from faultkit import ENV, image_folder, m3i_cmd, pretrain_args
from m3i.runs import checkpoint as ckpt

# each worker registers os.abort() among the exit handlers of its own process
ABORT_AT_WORKER_EXIT = """
import multiprocessing.util, os
from m3i.train import setup
init = setup.worker_init
def aborting_init(worker_id):
    init(worker_id)
    multiprocessing.util.Finalize(None, os.abort, exitpriority=100)
setup.worker_init = aborting_init
"""


@pytest.mark.slow
def test_a_worker_that_aborts_while_the_loader_ends_leaves_a_finished_run(tmp_path):
    data = image_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = pretrain_args(out, data, "train.steps=6", "data.num_workers=2")
    done = subprocess.run(m3i_cmd(*args, wrapper=ABORT_AT_WORKER_EXIT), env=ENV, capture_output=True,
                          text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    assert "a data loader worker failed while the loader ended" in done.stderr
    assert "killed by signal" in done.stderr  # the loader's own words, kept in the warning
    assert ckpt.find(out).name == "step_000006"
