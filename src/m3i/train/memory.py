"""The memory plan of `m3i pretrain --dry-run --gpus N --gpu-memory SIZE [--nodes M]`: what each
rank holds at the peak of a training step, under each strategy, before a GPU is rented.

Per rank, at the recipe's batch (``data.batch_size / N`` images):

- parameters: every parameter and buffer in the dtype the trainer keeps it (float32). Sharded
  (FSDP over the N ranks, HSDP over the N / M ranks of a node): the shards, what FSDP leaves whole
  (0-d temperatures, a frozen text tower with its caption cache, buffers), and what a step gathers:
  the objective's own parameters (decoders, heads, class tables: FSDP's root module, whole for
  the whole step) and two units (blocks) in the compute dtype, the one computing and the next;
- gradients: one per trainable parameter; DDP keeps a second copy in its buckets; sharded, the
  shards, plus the root's whole gradients before their reduce-scatter and one unit's;
- optimiser state: fused AdamW's two moments per trainable parameter, in its dtype, sharded as
  the parameters are;
- activations: what autograd keeps for the backward pass, *measured*: the recipe's step runs on
  fake tensors (shapes and dtypes, no memory, nothing computed) at two small batches under the
  recipe's autocast, a saved-tensors hook sums the bytes of every storage autograd keeps (each
  once; the parameters themselves left out), and the sum is fitted as a fixed part (autocast's
  copies of the weights) plus a part per image. With gradient checkpointing the online backbone
  keeps each unit's input instead of what the unit saves, and recomputes one unit at a time (its
  saved bytes come back during its backward). FSDP's bf16 units need no autocast copy of their
  weights; everything else counts alike under every strategy. The EMA teacher and frozen towers
  run without gradient (nothing saved); the decoders, heads and losses count.

The total is the sum of the four, and that is the peak: the trainer clears the gradients after
the forward pass, so when the backward pass begins the previous step's gradients, AdamW's state
and every activation coexist (checked against the CPU allocator's peak over the trainer's own
steps in ``tests/train/test_memory_plan.py``, within a few per cent). A plan fits when
it stays under :data:`USABLE` of the GPU's memory (the rest for the CUDA context, NCCL's
buffers and the allocator's fragmentation). With ``train.accum_steps`` K > 1 the activations
are those of a micro-batch of B/K, plus what exact accumulation keeps of the whole batch
(each term's predictions and targets, the target encoders' features, the views), measured in
the same fake pass.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, fields, is_dataclass

import torch
from torch import Tensor, nn

from ..memory import human
from .strategy import backbone_units, host_parameters

USABLE = 0.9  # the share of a GPU's memory a plan may fill
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    """``80GiB``, ``80GB``, ``81920MiB``, ``85899345920`` -> bytes (GiB and MiB are 1024-based, GB
    and MB 1000-based, as the GPU makers and ``nvidia-smi`` write them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{flag} {text}: expected a size such as 80GiB, 80GB or 40960MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def check_launch(gpus: int, nodes: int | None) -> int:
    """The node count of ``gpus`` GPUs (``nodes``, or 1 up to 8 GPUs and nodes of 8 beyond), each
    check failing with one line naming the flag."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus {gpus}: expected a number of GPUs >= 1")
    if nodes is None:
        nodes = gpus // 8 if gpus > 8 and gpus % 8 == 0 else 1
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or gpus % nodes:
        raise ValueError(f"--nodes {nodes}: expected a number of nodes >= 1 that divides --gpus {gpus}")
    return nodes


# -- the objective on fake tensors ---------------------------------------------------------------
def traced_objective(recipe, num_classes: int, fake: bool = True):
    """The recipe's objective in training mode on fake CPU tensors (torch's ``FakeTensorMode``:
    shapes and dtypes, no memory, nothing computed) -> (objective, the mode to run it under).
    Built on the meta device, then given fake storage; a batch staged on the host enters the
    mode as it is. ``fake=False``: on real CPU tensors (seed 0), with no mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..objective import Objective

    if not fake:
        torch.manual_seed(0)
        return Objective(recipe, num_classes).train(), nullcontext()
    with torch.device("meta"):
        objective = Objective(recipe, num_classes)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        objective = objective.to_empty(device="cpu")
    return objective.train(), mode


def traced(recipe, num_classes: int, run):
    """``run(objective, mode)`` on the fake objective of :func:`traced_objective`; where the step
    reads a value back to the host (a plugin's part, the checks of ``M3I_DEBUG=1``), which fake
    tensors cannot answer, on real CPU tensors instead (the same figures, at the memory and time
    of a real step)."""
    from torch._subclasses import fake_tensor as ft

    try:
        return run(*traced_objective(recipe, num_classes))
    except (ft.DataDependentOutputException, ft.DynamicOutputShapeException):
        return run(*traced_objective(recipe, num_classes, fake=False))


class Captions:
    """What ``Objective.prepare`` reads of the data: its captions."""

    def __init__(self, captions: list[str]):
        self._captions = captions

    def captions(self) -> list[str]:
        return self._captions


def compute_precision(precision: str) -> str:
    """The precision a step runs in on the GPUs a plan is for: ``auto`` is bf16 there (A100, H100)."""
    return "bf16" if precision == "auto" else precision


def cpu_autocast(precision: str):
    """The trainer's autocast of ``precision``, on the CPU the fake step runs on."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# -- parameters ------------------------------------------------------------------------------------
@dataclass
class Parameters:
    """Bytes of the objective's parameters and buffers as the trainer keeps them, grouped as FSDP
    lays them out (:func:`m3i.train.strategy.shard`)."""

    total: int            # every parameter and buffer, whole
    shardable: int        # the parameters FSDP shards (units and root), trainable or not
    whole: int            # what it leaves whole on every rank: 0-d and host parameters, buffers
    trainable: int        # every trainable parameter
    trainable_whole: int  # of which left whole
    root: int             # the root's shardable parameters, gathered whole for a step
    root_trainable: int   # of which trainable
    unit: int             # the largest unit
    unit_trainable: int   # the largest unit's trainable parameters


def count_parameters(objective: nn.Module) -> Parameters:
    """The :class:`Parameters` of ``objective`` (any device: meta and fake ones included)."""
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    units = [u for net in objective.encoders() for u in backbone_units(net)]
    in_units = {id(p) for u in units for p in u.parameters()}
    host = {id(p) for p in host_parameters(objective)}
    params = list(objective.parameters())
    whole = [p for p in params if p.ndim == 0 or id(p) in host]
    shardable = [p for p in params if id(p) not in {id(w) for w in whole}]
    root = [p for p in shardable if id(p) not in in_units]
    biggest = max(units, key=lambda u: size(u.parameters()), default=None)
    return Parameters(
        total=size(params) + size(objective.buffers()), shardable=size(shardable),
        whole=size(whole) + size(objective.buffers()), trainable=size(p for p in params if p.requires_grad),
        trainable_whole=size(p for p in whole if p.requires_grad), root=size(root),
        root_trainable=size(p for p in root if p.requires_grad),
        unit=size(biggest.parameters()) if biggest is not None else 0,
        unit_trainable=size(p for p in biggest.parameters() if p.requires_grad) if biggest is not None else 0)


# -- activations -----------------------------------------------------------------------------------
def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _copied_parameter(t: Tensor) -> Tensor | None:
    """The parameter ``t`` is autocast's cast of, or a view of that cast (a linear layer keeps its
    weight's transpose), else None."""
    fn = (t._base if t._base is not None else t).grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
        return None
    src = fn.next_functions[0][0]
    return getattr(src, "variable", None) if src is not None else None


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """While entered: every storage autograd keeps for the backward pass, once, by where it was
    first kept (inside a call of one of ``units``, or elsewhere), the parameters and buffers of
    ``objective`` left out; autocast's copies of the units' weights apart; and the input of each
    call of a unit (what gradient checkpointing keeps in place of what the unit saves)."""

    def __init__(self, objective: nn.Module, units: list[nn.Module]):
        self.skip = {_key(t) for t in [*objective.parameters(), *objective.buffers()]}
        self.unit_params = {id(p) for u in units for p in u.parameters()}
        self.units, self.call, self.calls = units, None, 0
        self.saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, unit call or None)
        self.inputs: dict[int, int] = {}                     # storage of a unit call's input -> bytes
        self.unit_copies = 0  # bytes of autocast's copies of the units' weights
        self._hooks: list = []
        super().__init__(self._pack, lambda t: t)

    def __enter__(self):
        for u in self.units:
            self._hooks.append(u.register_forward_pre_hook(self._enter_unit))
            self._hooks.append(u.register_forward_hook(self._leave_unit))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _enter_unit(self, module, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], Tensor):
            self.call, self.calls = self.calls, self.calls + 1
            self.inputs.setdefault(_key(args[0]), args[0].untyped_storage().nbytes())

    def _leave_unit(self, module, args, out):
        self.call = None

    def _pack(self, t: Tensor) -> Tensor:
        key = _key(t)
        if key in self.skip or key in self.saved:
            return t
        nbytes = t.untyped_storage().nbytes()
        src = _copied_parameter(t)
        if src is not None and id(src) in self.unit_params:
            self.unit_copies += nbytes
            self.saved[key] = (nbytes, -1)  # counted apart
        else:
            self.saved[key] = (nbytes, self.call)
        return t

    def totals(self) -> tuple[int, int, int]:
        """(everything kept; what checkpointing the units keeps: what is kept outside them and
        their inputs; the most one unit call keeps beside its weights' copies, which a
        checkpointed unit keeps again while it is recomputed in the backward pass)."""
        per_call: dict[int, int] = {}
        outside = 0
        for n, call in self.saved.values():
            if call is None:
                outside += n
            elif call >= 0:
                per_call[call] = per_call.get(call, 0) + n
        inputs = sum(n for key, n in self.inputs.items() if key not in self.saved or self.saved[key][1] is not None)
        return sum(n for n, _ in self.saved.values()), outside + inputs, max(per_call.values(), default=0)


def _storages(tree, seen: dict[int, int]) -> None:
    """The storages of every tensor in a nest of dataclasses, dicts, lists and tuples, into ``seen``."""
    if isinstance(tree, Tensor):
        seen.setdefault(_key(tree), tree.untyped_storage().nbytes())
    elif is_dataclass(tree) and not isinstance(tree, type):
        for f in fields(tree):
            _storages(getattr(tree, f.name), seen)
    elif isinstance(tree, dict):
        for v in tree.values():
            _storages(v, seen)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _storages(v, seen)


def _line(pair: tuple[int, int], batches: tuple[int, int], b: float) -> float:
    """The straight line through (batches[0], pair[0]) and (batches[1], pair[1]), at ``b``."""
    slope = (pair[1] - pair[0]) / (batches[1] - batches[0])
    return max(0.0, pair[0] + slope * (b - batches[0]))


@dataclass
class Activations:
    """What autograd keeps during a step, measured at two batches and taken as linear in the batch."""

    batches: tuple[int, int]
    saved: tuple[int, int]       # everything kept, units not checkpointed
    outside: tuple[int, int]     # checkpointed: what is kept outside the units, and the units' inputs
    unit_call: tuple[int, int]   # the most one unit call keeps (again while recomputed), its weights' copies apart
    unit_copies: int             # autocast's copies of the units' weights
    kept_per_image: float        # what exact accumulation keeps of the rank's whole batch, per image

    def at(self, batch: float, ckpt: bool, gathered_units: bool = False, accum: int = 1) -> float:
        """Bytes for a rank's batch of ``batch`` images in ``accum`` micro-batches. ``gathered_units``:
        FSDP's bf16 units, whose weights are gathered in the compute dtype (no autocast copy).
        Checkpointed, autocast's cache still holds every unit's weight copy until the forward
        pass ends, and a unit's own activations return while it is recomputed: the larger counts."""
        b, copies = batch / accum, 0 if gathered_units else self.unit_copies
        if ckpt:
            out = _line(self.outside, self.batches, b) + max(_line(self.unit_call, self.batches, b), copies)
        else:
            out = _line(self.saved, self.batches, b) - self.unit_copies + copies
        return out + (self.kept_per_image * batch if accum > 1 else 0.0)

    def per_image(self, ckpt: bool) -> float:
        """The bytes each image adds (checkpointed: with its share of a recomputed unit)."""
        slope = lambda pair: (pair[1] - pair[0]) / (self.batches[1] - self.batches[0])  # noqa: E731
        return slope(self.outside) + slope(self.unit_call) if ckpt else slope(self.saved)


def measure_activations(recipe, num_classes: int, make_batch, batches: tuple[int, int] = (2, 4),
                        fake: bool = True) -> Activations:
    """Run the recipe's step forward on fake tensors at each of ``batches`` (``make_batch(b)``: a
    synthetic batch of ``b`` images, staged on the host) under the recipe's autocast, with the
    online backbone's units not checkpointed, counting what autograd keeps (:class:`SavedTensors`);
    then what exact accumulation's pass without gradient keeps of the batch. ``fake=False``: on
    real CPU tensors."""
    def measure(objective, mode):
        return _measure(recipe, objective, mode, make_batch, batches)

    return traced(recipe, num_classes, measure) if fake else measure(*traced_objective(recipe, num_classes, False))


def _measure(recipe, objective, mode, make_batch, batches) -> Activations:
    objective.backbone.set_grad_checkpointing(False)
    units = backbone_units(objective.backbone)
    data = make_batch(max(batches))
    objective.prepare(Captions(data.captions), progress=False)
    autocast = cpu_autocast(compute_precision(recipe.train.precision))
    counts, copies = [], 0
    for b in batches:
        staged = objective.stage(make_batch(b), torch.device("cpu"))
        counter = SavedTensors(objective, units)
        with mode, autocast, counter:
            out = objective(staged)
        del out
        counts.append(counter.totals())
        copies = counter.unit_copies
    staged = objective.stage(data, torch.device("cpu"))
    kept: dict[int, int] = {}
    with mode, autocast, torch.no_grad():
        views = objective.views_of(staged)
        _storages([objective.embed(staged, views), views], kept)
    saved, outside, call = zip(*counts)
    return Activations(tuple(batches), saved, outside, call, copies, sum(kept.values()) / max(batches))


# -- the plan --------------------------------------------------------------------------------------
def static_bytes(p: Parameters, strategy: str, shards: int, precision: str) -> dict[str, float]:
    """Parameters, gradients and optimiser state per rank under ``strategy`` (``single``: one
    process; ``ddp``; ``fsdp`` / ``hsdp`` sharded over ``shards`` ranks)."""
    if strategy in ("single", "ddp"):
        return {"parameters": p.total, "gradients": p.trainable * (2 if strategy == "ddp" else 1),
                "optimiser": 2 * p.trainable}
    compute = 0.5 if precision == "bf16" else 1.0  # FSDP's units gather (and differentiate) in bf16
    sharded_trainable = p.trainable - p.trainable_whole
    return {"parameters": p.shardable / shards + p.whole + p.root + 2 * compute * p.unit,
            "gradients": sharded_trainable / shards + p.trainable_whole + p.root_trainable + compute * p.unit_trainable,
            "optimiser": 2 * (sharded_trainable / shards + p.trainable_whole)}


def per_rank(p: Parameters, acts: Activations, strategy: str, shards: int, batch: int, ckpt: bool,
             precision: str, accum: int = 1) -> dict[str, float]:
    """Bytes per rank, by part and in ``total``, for a rank's ``batch`` images in ``accum`` micro-batches."""
    precision = compute_precision(precision)
    out = static_bytes(p, strategy, shards, precision)
    gathered = strategy in ("fsdp", "hsdp") and precision == "bf16"
    out["activations"] = acts.at(batch, ckpt, gathered, accum)
    out["total"] = sum(out.values())
    return out


def _accum_choices(batch: int, paired: bool) -> list[int]:
    """Every ``train.accum_steps`` that cuts a rank's batch into equal micro-batches, smallest first."""
    cut = batch // 2 if paired else batch
    return [k for k in range(1, cut + 1) if cut % k == 0 and batch % k == 0]


def plan(p: Parameters, acts: Activations, recipe, gpus: int, nodes: int, gpu_memory: int | None) -> dict:
    """The memory plan of ``recipe`` on ``gpus`` GPUs in ``nodes`` nodes of ``gpu_memory`` bytes
    each (None: the figures without a verdict)."""
    batch, paired = recipe.data.batch_size, recipe.views.input_mode == "mix"
    precision = compute_precision(recipe.train.precision)
    rank_batch = batch // gpus
    usable = None if gpu_memory is None else USABLE * gpu_memory
    rows = []
    for strategy, shards in (("ddp", 1), ("fsdp", gpus), ("hsdp", gpus // nodes)):
        for ckpt in (False, True):
            row = {"strategy": strategy, "shards": shards, "replicas": gpus // shards, "ckpt": ckpt,
                   **per_rank(p, acts, strategy, shards, rank_batch, ckpt, precision)}
            if usable is not None:
                row.update(_fit(p, acts, strategy, shards, rank_batch, ckpt, precision, usable, paired))
            rows.append(row)
    return {"gpus": gpus, "nodes": nodes, "gpu_memory": gpu_memory, "usable": usable, "batch": batch,
            "rank_batch": rank_batch, "divides": batch % gpus == 0 and rank_batch > 0, "precision": precision,
            "recipe": {"strategy": recipe.train.strategy, "ckpt": recipe.backbone.grad_checkpointing,
                       "accum_steps": recipe.train.accum_steps},
            "activations": acts, "rows": rows}


def _fit(p, acts, strategy, shards, rank_batch, ckpt, precision, usable, paired) -> dict:
    """Whether the rank's batch fits in one pass, the largest micro-batch that fits (beside what
    accumulating the rank's batch keeps, when it is less than the batch), and the fewest
    micro-batches (``train.accum_steps``) that keep the global batch."""
    def total(micro: int) -> float:  # a rank's batch in micro-batches of ``micro`` images
        return per_rank(p, acts, strategy, shards, rank_batch, ckpt, precision, rank_batch / max(micro, 1e-9))["total"]

    lo, hi = 0, rank_batch  # the largest micro-batch within ``usable``: total grows with it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= usable else (lo, mid - 1)
    accum = next((k for k in _accum_choices(rank_batch, paired) if rank_batch // k <= lo), None)
    return {"fits": lo == rank_batch, "micro_batch": lo, "accum_steps": accum if lo else None}


def format_plan(info: dict) -> list[str]:
    """The dry run's lines of a :func:`plan`."""
    acts: Activations = info["activations"]
    mem = info["gpu_memory"]
    head = (f"# memory per rank ({info['gpus']} GPU{'s' if info['gpus'] > 1 else ''}, {info['nodes']} "
            f"node{'s' if info['nodes'] > 1 else ''}" + (f", {human(mem)} each, {human(info['usable'])} usable" if mem
                                                          else "; --gpu-memory SIZE says what fits") + ")")
    lines = [head]
    if not info["divides"]:
        lines.append(f"data.batch_size {info['batch']} does not divide over {info['gpus']} GPUs: no run on them")
        return lines
    r = info["recipe"]
    lines.append(f"a rank's batch: {info['rank_batch']} images (data.batch_size {info['batch']} / {info['gpus']}), "
                 f"{info['precision']}; the recipe's strategy: {r['strategy']}, gradient checkpointing "
                 f"{'on' if r['ckpt'] else 'off'}, train.accum_steps {r['accum_steps']}")
    lines.append(f"activations: measured on the recipe's step (fake tensors, batches {acts.batches[0]} and "
                 f"{acts.batches[1]}): {human(acts.per_image(False))} per image + {human(acts.at(0, False))}; "
                 f"checkpointed {human(acts.per_image(True))} per image + {human(acts.at(0, True))}; accumulation "
                 f"keeps {human(acts.kept_per_image)} per image of the rank's batch")
    cols = ["strategy", "ckpt", "parameters", "gradients", "optimiser", "activations", "total"]
    if mem:
        cols += ["fits", "micro-batch", "accum_steps"]
    lines.append("  ".join(f"{c:>11}" if i else f"{c:<14}" for i, c in enumerate(cols)))
    for row in info["rows"]:
        name = {"ddp": "ddp", "fsdp": f"fsdp ({row['shards']})", "hsdp": f"hsdp ({row['replicas']}×{row['shards']})"}
        cells = [name[row["strategy"]], "on" if row["ckpt"] else "off"] + [
            human(row[k]) for k in ("parameters", "gradients", "optimiser", "activations", "total")]
        if mem:
            cells += ["yes" if row["fits"] else "no", str(row["micro_batch"]),
                      str(row["accum_steps"]) if row["accum_steps"] else "none fits"]
        lines.append("  ".join(f"{c:>11}" if i else f"{c:<14}" for i, c in enumerate(cells)))
    return lines
