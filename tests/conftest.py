import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# s: how long a test waits for a child process (a command line, a benchmark, a gloo rank) before
# calling it hung. A guard against hangs only, far beyond what any of them takes on a slow, loaded
# machine: no test's outcome depends on how fast the machine is.
HANG = 1800.0


def have_builtin_data() -> bool:
    from m3i.data import data_root

    root = data_root()
    fm = (root / "fashion-mnist").is_dir() or os.path.isdir("/usr/share/datasets/fashion-mnist")
    return fm and (root / "emoji" / "emoji.json").is_file()


needs_data = pytest.mark.skipif(not have_builtin_data(), reason="built-in data not fetched: run `make data`")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def killed_and_resumed(monkeypatch, recipe, out, at_step: int, **kw):
    """``pretrain`` killed right after its step-``at_step`` checkpoint is written, then resumed."""
    from m3i.train import hooks, loop

    real_save = hooks.save_checkpoint

    def crash_after_save(run, step, *a, **k):
        path = real_save(run, step, *a, **k)
        if step == at_step:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(hooks, "save_checkpoint", crash_after_save)
    with pytest.raises(KeyboardInterrupt):
        loop.pretrain(recipe, out, progress=False, **kw)
    monkeypatch.setattr(hooks, "save_checkpoint", real_save)
    return loop.pretrain(recipe, out, resume=out, progress=False, **kw)
