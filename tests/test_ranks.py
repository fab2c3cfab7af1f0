"""The gloo harness of the distributed tests (ranks.py): a failure names every rank's own error,
a rank killed by a signal included, and a hang ends at the time-out with a message saying so."""
import os
import threading

import pytest
import torch
import torch.distributed as tdist

from ranks import run_ranks


def _fail_differently(rank):
    tdist.barrier()  # the group is up on both ranks
    if rank == 0:
        raise ValueError("rank 0's own error")
    os.abort()  # what a C++ std::terminate ends in


def _wait_for_a_rank_that_never_comes(rank):
    if rank == 0:
        tdist.barrier()
    else:
        threading.Event().wait()  # a rank stuck for good


def _gather_ranks(rank, out):
    x = torch.tensor([float(rank)])
    got = [torch.zeros(1) for _ in range(2)]
    tdist.all_gather(got, x)
    torch.save([float(t) for t in got], f"{out}/rank{rank}.pt")


def test_a_failure_reports_each_rank_its_exit_and_its_own_error():
    with pytest.raises(AssertionError) as info:
        run_ranks(_fail_differently)
    text = str(info.value)
    assert text.startswith("_fail_differently failed on 2 gloo ranks")
    rank0, rank1 = text.split("--- rank 0: ")[1].split("--- rank 1: ")
    assert rank0.startswith("exit code 1") and "ValueError: rank 0's own error" in rank0
    assert rank1.startswith("killed by SIGABRT")
    assert "Fatal Python error: Aborted" in rank1 and "_fail_differently" in rank1  # faulthandler's stack


def test_a_hang_ends_at_the_time_out_with_a_message():
    with pytest.raises(AssertionError, match=r"did not end within 15 s \(a hang\?\)") as info:
        run_ranks(_wait_for_a_rank_that_never_comes, timeout=15)
    for r in range(2):
        assert f"--- rank {r}: still running: killed" in str(info.value)


@pytest.mark.parametrize("rendezvous", ["file", "env"])
def test_both_rendezvous_start_a_group_of_two(tmp_path, rendezvous):
    if rendezvous == "env":  # as the trainer's setup_device does under torchrun
        run_ranks(_init_from_env_then_gather, str(tmp_path), rendezvous="env")
    else:
        run_ranks(_gather_ranks, str(tmp_path))
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt") == [0.0, 1.0]


def _init_from_env_then_gather(rank, out):
    assert not tdist.is_initialized() and os.environ["RANK"] == str(rank)
    tdist.init_process_group("gloo")
    _gather_ranks(rank, out)
