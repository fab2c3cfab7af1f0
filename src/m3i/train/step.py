"""One training step that never waits for the device.

A step whose loss or gradient norm is not finite is skipped, as in any careful trainer, but the
decision stays on the device: the fused AdamW kernel takes it as ``found_inf`` (parameters,
moments and step count left as they were), the EMA teacher's update is weighted by it, and
batch-norm statistics the bad forward pass moved are put back. Nothing is read back to the host
in the step; :class:`BadSteps` keeps the counts on the device and the loop reads them with the
metrics (every ``log_every`` steps, at checkpoints and every ``max_bad_steps`` steps).

In fp16 the gradient scaler skips steps of its own: a finite loss whose scaled gradients overflow
float16 is skipped while the scaler halves its loss scale, as it does at the start of every fp16
run (from 2^16 until the gradients fit). Those steps are counted apart (``scaler_skips``): they
are no fault of the data or the learning rate, so they neither make a row of bad steps nor keep
a checkpoint from being written. Once the scale is below 1 the gradients overflow unscaled, and
a skip counts as a bad step again.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from .. import distributed as dist
from ..batch import Batch, Losses
from .accumulation import MicroBatches
from ..layers import running_stats
from . import strategy


class BadSteps:
    """Skipped-step counters on the device: in all, in a row now, and the longest row since the
    last read; and, of those in all, the fp16 gradient scaler's own skips (``scaler_total`` after
    a read), which neither add to a row nor end one."""

    def __init__(self, device: torch.device, total: int = 0, scaler: int = 0):
        self.total = torch.tensor(total, device=device)
        self.scaler = torch.tensor(scaler, device=device)
        self.in_row = torch.zeros((), dtype=torch.long, device=device)
        self.worst = torch.zeros((), dtype=torch.long, device=device)
        self.scaler_total = scaler  # on the host, as of the last read

    def add(self, bad: Tensor, by_scaler: Tensor | None = None) -> None:
        """``bad``: the step was skipped; ``by_scaler``: skipped by the gradient scaler (a part of ``bad``)."""
        by_scaler = torch.zeros_like(bad) if by_scaler is None else by_scaler
        fault = (bad & ~by_scaler).long()
        self.total += bad.long()
        self.scaler += by_scaler.long()
        self.in_row.add_(fault).mul_(fault | by_scaler.long())  # a taken step ends the row, a scaler skip holds it
        torch.maximum(self.worst, self.in_row, out=self.worst)

    def read(self) -> tuple[int, int, int]:
        """(total, in a row now, longest row since the last read): one transfer to the host."""
        total, in_row, worst, self.scaler_total = torch.stack([self.total, self.in_row, self.worst,
                                                               self.scaler]).tolist()
        self.worst.copy_(self.in_row)
        return total, in_row, worst


class Skips:
    """What the loop says of the skipped steps at each read of :class:`BadSteps`: a line for the
    faults since the last read (a loss or gradients not finite), one for the fp16 gradient
    scaler's own skips, told as what they are, and the counts a checkpoint keeps."""

    def __init__(self, bad: BadSteps, start: int, scaler: torch.amp.GradScaler | None = None):
        self.bad, self.scaler, self.read_at = bad, scaler, start
        self.total, self.by_scaler, self.in_row = int(bad.total), bad.scaler_total, 0
        self.faults_before = self.faults  # those of the run before it resumed here

    @property
    def faults(self) -> int:
        """Steps skipped for a loss or gradients that were not finite, in all."""
        return self.total - self.by_scaler

    def read(self, step: int, say=None) -> int:
        """The counters at ``step`` (waits for the device), the steps skipped since the last read
        told to ``say`` (a print function; None: told nowhere) -> the longest row of faults since
        the last read."""
        faults, by_scaler, since = self.faults, self.by_scaler, self.read_at
        self.total, self.in_row, worst = self.bad.read()
        self.by_scaler, self.read_at = self.bad.scaler_total, step
        lines = []
        if self.faults > faults:
            lines.append(f"step {step}: {self.faults - faults} step(s) skipped since step {since} (loss or gradients "
                         f"not finite; {self.in_row} in a row now, {self.faults} in all)")
        if self.by_scaler > by_scaler:
            lines.append(f"step {step}: {self.by_scaler - by_scaler} step(s) skipped by the fp16 gradient scaler since "
                         f"step {since}: their scaled gradients overflowed float16, so it lowered its loss scale (now "
                         f"{self.scaler.get_scale():g}), as it does until the gradients fit; no fault of the data or "
                         f"the learning rate")
        for line in lines if say else ():
            say(line)
        return worst

    def counters(self) -> dict:
        """What a checkpoint keeps, so that a resumed run counts on: the skipped steps and, in fp16,
        the scaler's skips, its loss scale and its growth count."""
        if self.scaler is None:
            return {"bad_steps": self.total}
        return {"bad_steps": self.total, "scaler_skips": self.by_scaler, "scaler": self.scaler.state_dict()}


class TrainStep:
    """forward (``model``, DDP/FSDP or not) → backward → clip → AdamW → EMA teacher, with the
    skip of a non-finite step decided on the device. ``opt`` must be a fused AdamW. With
    ``train.accum_steps`` K > 1, forward and backward run once per micro-batch of B/K after a pass
    without gradient over all of them: the gradient of the batch of B, exactly
    (:mod:`m3i.train.accumulation`), reduced across ranks once, at the last micro-batch."""

    def __init__(self, objective: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, sched, train,
                 autocast: AbstractContextManager, bad: BadSteps, scaler: torch.amp.GradScaler | None = None):
        self.objective, self.model, self.opt, self.sched, self.train = objective, model, opt, sched, train
        self.autocast, self.bad, self.scaler = autocast, bad, scaler
        self.stats = running_stats(objective)
        self.momentum: float | None = None  # the EMA teacher's momentum at the last step (None: no teacher)
        self.params = [p for p in objective.parameters() if p.requires_grad]

    def __call__(self, batch: Batch, step: int) -> Losses:
        """Run step ``step`` (0-based) and return the objective's outputs (device tensors)."""
        tr = self.train
        kept = [b.clone() for b in self.stats]
        if tr.accum_steps == 1:
            with self.autocast:
                outputs = self.model(batch)
            finite = dist.all_ranks(torch.isfinite(outputs.loss.detach()))  # every rank takes, or skips, the step
            self.opt.zero_grad(set_to_none=True)
            self.backward(outputs.loss)
        else:
            self.opt.zero_grad(set_to_none=True)
            outputs = self.accumulate(batch, tr.accum_steps)
            finite = dist.all_ranks(torch.isfinite(outputs.loss.detach()))
        strategy.sync_replicated_grads(self.objective)  # FSDP: the few parameters it leaves whole
        if self.scaler is not None:  # the true gradients; a step whose scaled gradients overflowed is skipped below
            self.scaler.unscale_(self.opt)
        # the norm of the (all-reduced) gradients; max_norm=inf only measures it
        norm = strategy.clip_grad_norm_(self.params, tr.clip_grad if tr.clip_grad > 0 else float("inf"))
        bad = ~(finite & torch.isfinite(norm))
        by_scaler = None
        if self.scaler is not None:  # a finite loss, its scaled gradients overflowed: the scaler's own skip
            by_scaler = bad & finite & (self.scaler._get_scale_async() >= 1)
        self.opt.found_inf = bad.float()
        self.opt.step()
        if self.scaler is not None:  # halve the scale after an overflow, grow it after a run of good steps
            self.scaler.update()
        self.sched.step()
        for b, k in zip(self.stats, kept):
            b.copy_(torch.where(bad, k, b))
        self.momentum = self.objective.update_teacher(step + 1, tr.steps, skip=bad)
        self.bad.add(bad, by_scaler)
        return outputs

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def accumulate(self, batch: Batch, k: int) -> Losses:
        """The gradient of ``batch`` from ``k`` micro-batches (added up in ``.grad``) -> the
        outputs of the whole batch (those of its last micro-step)."""
        with self.autocast:
            micro = MicroBatches(self.objective, batch, k)
        for j, (part, views) in enumerate(micro):
            with strategy.gradient_sync(self.model, j == k - 1):
                with self.autocast:
                    outputs = self.model(part, views, cache=micro)
                self.backward(outputs.loss)
        return outputs


def make_scaler(device: torch.device, precision: str, state: dict | None = None) -> torch.amp.GradScaler | None:
    """fp16's gradient scaler (none for bf16 and fp32), with its state when resuming."""
    if precision != "fp16":
        return None
    scaler = torch.amp.GradScaler(device.type)
    if state:
        scaler.load_state_dict(state)
    return scaler


def make_optimizer(groups: list[dict], train) -> torch.optim.Optimizer:
    """Fused AdamW (CPU and CUDA): one kernel for every parameter, and the on-device skip."""
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=True)


def keep_fused(opt: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a checkpoint written by a non-fused AdamW."""
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, None
