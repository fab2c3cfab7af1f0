"""`m3i pretrain --dry-run`: what a run will cost, before it starts.

Nothing is trained and nothing is written. The objective is built on fake CPU tensors (shapes
and dtypes, no memory; :func:`m3i.train.memory.traced_objective`) and one training step's forward
and backward (through the same path as the trainer) run on a small synthetic batch under
``torch.utils.flop_counter``, and with ``train.accum_steps`` > 1 the pass without gradient
that exact accumulation adds (one more forward); the FLOPs per image are that count over
the batch, the FLOPs per step that times the global batch (the batch-quadratic parts, contrastive
logits over the batch, are a small share and scale as they would not: an approximation). The wall
time divides the run's FLOPs by the throughput ``benchmarks/gpu_check.py`` (in m3i's source
repository) last measured (``results/gpu.json`` or ``$M3I_GPU_CHECK``: the m3i ViT-B/16 step's
achieved FLOP/s) times the number of GPUs; a recipe whose step is far smaller than that one (the
CPU recipes) would not reach its throughput, and gets no estimate. With ``--gpu-memory`` the
memory plan per rank under DDP, FSDP and HSDP follows (:mod:`m3i.train.memory`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from ..batch import Batch
from ..config import Recipe
from ..targets import TARGETS
from . import memory
from .memory import Captions  # noqa: F401  (what Objective.prepare reads; benchmarks import it from here)

GPU_CHECK = "results/gpu.json"
# a step under this share of the measured step's FLOPs is bound by other costs (launches, the
# loader): the measured FLOP/s say nothing of its time
SMALL_STEP = 0.1
TIME_IT = "time a few steps of the run itself (the same command without --dry-run, with --steps 20, prints img/s)"


def source_sizes(recipe: Recipe) -> list[tuple[int | None, str]]:
    """Per source: (number of samples, where the figure comes from)."""
    from ..data import build_source

    out = []
    for s in recipe.data.sources:
        try:
            out.append((len(build_source(s.spec, labels=s.labels, captions=s.captions)), "counted"))
        except (OSError, ValueError, RuntimeError) as e:
            why = " ".join(str(e).split()).split(": expected")[0][:100]
            out.append((s.size, "declared (not at hand: " + why + ")") if s.size else (None, "not at hand: " + why))
    return out


# words of each synthetic caption: more tokens than any text tower keeps (its max_length, 32), so
# that every caption is cut to it. A run pads each batch to its longest caption, and among the
# hundreds of captions of a batch at scale the longest reaches the cut: a trained tower's step
# costs its full max_length, and a dry run with short captions would count a fraction of it.
CAPTION_WORDS = 600


def synthetic_batch(recipe: Recipe, b: int, num_classes: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    s = recipe.data.image_size
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, max(num_classes, 1), (b,), generator=g) if num_classes else torch.full((b,), -1)
    return Batch(labels, [" ".join([f"a photo of thing {i}"] + ["and"] * CAPTION_WORDS) for i in range(b)], images)


def count_cpu_attention() -> None:
    """torch.utils.flop_counter counts the CUDA attention kernels but not the CPU one that
    ``scaled_dot_product_attention`` takes here: give it the same formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    for op, formula in (("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop)):
        target = getattr(aten, op, None)
        if target is not None and target not in fc.flop_registry:
            fc.register_flop_formula(target, get_raw=True)(formula)  # the formulas take shapes already


def step_flops(recipe: Recipe, num_classes: int, batch: int = 4) -> int:
    """FLOPs of one training step's forward and backward on ``batch`` synthetic images (fp32, on
    fake CPU tensors): the online encoder, the teacher, the decoders and a trained text tower. A
    frozen text tower embeds every caption once before training (``Objective.prepare``), as in a
    run: its step looks the embeddings up, and that one-time pass is not a step's cost."""
    count_cpu_attention()
    data = synthetic_batch(recipe, batch, num_classes)
    return memory.traced(recipe, num_classes, lambda obj, mode: _count(recipe, obj, mode, data))


def _count(recipe: Recipe, obj, mode, data: Batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    obj.prepare(memory.Captions(data.captions), progress=False)
    staged = obj.stage(data, torch.device("cpu"))  # the host's share (views, masks) on real tensors
    with mode, FlopCounterMode(display=False) as counter:
        obj(staged).loss.backward()
        if recipe.train.accum_steps > 1:  # exact accumulation's pass without gradient over the batch
            with torch.no_grad():
                obj(staged)
    return int(counter.get_total_flops())


def gpu_figure(path: str | Path | None = None) -> dict | None:
    """The last gpu_check.py figure: {gpu, achieved FLOP/s, img/s, batch}, or None."""
    path = Path(path or os.environ.get("M3I_GPU_CHECK", GPU_CHECK))
    try:
        res = json.loads(path.read_text())
        vit = res["sections"]["vit"]
        return {"gpu": res["environment"]["gpu"], "flops_per_s": vit["achieved_tflops"] * 1e12,
                "img_per_s": vit["img_per_s"], "flops_per_image": vit["achieved_tflops"] * 1e12 / vit["img_per_s"],
                "path": str(path), "what": f"{vit['model']} m3i step, batch {vit['batch']}, {vit['precision']}"}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def dry_run(recipe: Recipe, gpus: int = 8, gpu_check: str | Path | None = None, flop_batch: int = 4,
            gpu_memory: str | int | None = None, nodes: int | None = None) -> dict:
    """Everything `m3i pretrain --dry-run` prints, as a dict; with ``gpu_memory`` (bytes, or a size
    such as ``80GiB``) the memory plan on ``gpus`` GPUs in ``nodes`` nodes too."""
    from ..objective import Objective

    nodes = memory.check_launch(gpus, nodes)
    if isinstance(gpu_memory, str):
        gpu_memory = memory.parse_size(gpu_memory)
    tr, d = recipe.train, recipe.data
    sizes = source_sizes(recipe)
    labelled = [s for s, (n, how) in zip(d.sources, sizes) if s.labels and how == "counted"]
    num_classes, classes_from = 0, ""
    if any(TARGETS[t.target.kind].needs == "labels" for t in recipe.terms):  # a class table to size
        if labelled:
            from ..train.loop import build_mixture

            num_classes, classes_from = build_mixture(recipe).num_classes, "counted"
        else:
            num_classes, classes_from = 1000, "assumed: ImageNet-1k's, the labelled sources are not at hand"
    with torch.device("meta"):
        meta = Objective(recipe, num_classes)
    trainable = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in meta.parameters() if not p.requires_grad)
    backbone = sum(p.numel() for p in meta.backbone.parameters())
    flops = step_flops(recipe, num_classes, flop_batch)
    per_image = flops / flop_batch
    per_step = per_image * d.batch_size
    seen = tr.steps * d.batch_size
    total_w = sum(s.weight for s in d.sources)
    sources = []
    for s, (n, how) in zip(d.sources, sizes):
        images = seen * s.weight / total_w
        sources.append({"spec": s.spec, "images": images, "size": n, "size_from": how,
                        "epochs": images / n if n else None})
    fig = gpu_figure(gpu_check)
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    estimate, why_not = None, None
    if fig is None or (here is not None and here != fig["gpu"]):
        why_not = (f"no measured throughput for this machine ({here or 'cpu'}); {TIME_IT}, or, for GPUs, point "
                   f"$M3I_GPU_CHECK at the results/gpu.json that benchmarks/gpu_check.py of m3i's source repository "
                   f"writes")
    elif per_image < SMALL_STEP * fig["flops_per_image"]:
        why_not = (f"a step of this recipe ({_n(per_image)}FLOP per image) is far smaller than the one whose "
                   f"throughput was measured ({fig['what']}, {_n(fig['flops_per_image'])}FLOP per image) and would "
                   f"not reach it; {TIME_IT}")
    else:
        hours = tr.steps * per_step / (fig["flops_per_s"] * gpus) / 3600
        estimate = {**fig, "gpus": gpus, "hours": hours}
    plan = None
    if gpu_memory is not None:
        acts = memory.measure_activations(recipe, num_classes, lambda b: synthetic_batch(recipe, b, num_classes))
        plan = memory.plan(memory.count_parameters(meta), acts, recipe, gpus, nodes, gpu_memory)
    return {"recipe": recipe.model_dump(mode="json"), "parameters": {"trainable": trainable, "frozen": frozen,
            "backbone": backbone}, "memory": plan, "num_classes": num_classes, "classes_from": classes_from, "flops_per_image": per_image,
            "flops_per_step": per_step, "flops_batch": flop_batch, "steps": tr.steps, "warmup_steps": tr.warmup_steps,
            "global_batch": d.batch_size, "images_seen": seen, "sources": sources,
            "estimate": estimate, "no_estimate": why_not, "device_here": here or "cpu"}


def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def format_dry_run(info: dict) -> str:
    lines = ["# resolved recipe", yaml.safe_dump(info["recipe"], sort_keys=False).rstrip(), "", "# cost"]
    p = info["parameters"]
    lines.append(f"parameters:      {_n(p['trainable'])} trainable, {_n(p['frozen'])} frozen "
                 f"(backbone {_n(p['backbone'])})")
    if info["num_classes"]:
        lines.append(f"class table:     {info['num_classes']} classes ({info['classes_from']})")
    lines.append(f"FLOPs per image: {_n(info['flops_per_image'])}FLOP (forward + backward of one training step, "
                 f"counted by torch.utils.flop_counter on {info['flops_batch']} images)")
    lines.append(f"FLOPs per step:  {_n(info['flops_per_step'])}FLOP (global batch {info['global_batch']})")
    lines.append(f"steps:           {info['steps']} ({info['warmup_steps']} of warm-up)")
    lines.append(f"images seen:     {_n(info['images_seen'])} ({info['images_seen']:,})")
    for s in info["sources"]:
        ep = f"{s['epochs']:.1f} epochs" if s["epochs"] is not None else "epochs unknown"
        size = f"{s['size']:,} samples, {s['size_from']}" if s["size"] else s["size_from"]
        lines.append(f"  {s['spec']}: {_n(s['images'])} images, {ep} ({size})")
    lines.append(f"wall time:       {wall_time(info)}")
    if info.get("memory") is None:
        lines.append("memory per rank: give --gpu-memory SIZE (e.g. 80GiB) for the plan under DDP, FSDP and HSDP")
    else:
        lines += ["", *memory.format_plan(info["memory"])]
    return "\n".join(lines)


def wall_time(info: dict) -> str:
    """The wall-time line's text: the estimate, or why there is none and how to get a figure."""
    e = info["estimate"]
    if e is None:
        return f"not estimated: {info['no_estimate']}"
    hours = e["hours"]
    took = (f"{hours:.0f} h ({hours / 24:.1f} days)" if hours >= 1 else
            f"{hours * 60:.0f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s")
    return (f"{took} on {e['gpus']} × {e['gpu']} at {e['flops_per_s'] / 1e12:.0f} TFLOP/s each, the throughput "
            f"gpu_check.py measured ({e['what']}; {e['path']}), assuming it scales linearly over the GPUs")
