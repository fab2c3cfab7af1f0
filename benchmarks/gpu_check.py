"""One prepared check of the CUDA path, at most about 8 minutes on one GPU.

    M3I_DATA=/path/to/data python benchmarks/gpu_check.py [--out results/gpu.json] [--tokenizer DIR]
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu.json        # the same code, tiny, on the CPU

Sections, each in a subprocess of its own with a time limit (an error or a time-out is recorded
in the JSON and the next section runs; the JSON is rewritten after every section):

  peak      the bf16 matmul peak of this device (TFLOP/s), measured here: the MFU denominator
  recipes   every recipe (`m3i recipes`) for 20 steps through the real trainer
            (m3i.train.loop.pretrain), ok/error and step images/s (steps 5..20)
  vit       the m3i recipe's training step on ViT-B/16 at 224 px, batch 256, bf16: images/s,
            peak memory, model FLOPs per step (torch.utils.flop_counter) and MFU
  vit_compile  the same with train.compile (torch.compile of every backbone block)
  ddp       `torchrun --nproc_per_node 1` of the trainer: the NCCL DDP path, a few steps, then the
            same run with train.strategy=fsdp (FSDP2, sharded optimizer checkpoint)

Captions are encoded by the scratch text tower (`target_encoder.tower=scratch`), which needs only
the MiniLM tokenizer.json: from the installed package, or the folder given by --tokenizer (or
$M3I_TOKENIZER). The step timings use one real batch of the built-in mix, kept on the device, so
they measure the step (views, masks, every term, backward, AdamW, EMA), not the loader.
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

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("peak", "recipes", "vit", "ddp", "vit_compile")
# seconds: the most each section may take; the whole run also stops at --budget
LIMITS = {"peak": 45, "recipes": 180, "vit": 90, "ddp": 90, "vit_compile": 150}


# -- shared pieces --------------------------------------------------------------------------------
def caption_overrides(recipe_name: str) -> list[str]:
    """Switch every caption term of a recipe to the scratch text tower (no MiniLM weights needed)."""
    from m3i.config import load_recipe

    r = load_recipe(recipe_name)
    return [f"terms.{i}.target_encoder.tower=scratch" for i, t in enumerate(r.terms) if t.target.kind == "caption"]


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


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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
    from m3i.train.loop import pretrain

    names = a.recipes or recipe_names()
    steps = a.recipe_steps
    part["steps"], part["runs"] = steps, {}
    per = max(25.0, (a.limit - 5) / max(len(names), 1)) if not a.smoke else 600
    for name in names:
        row: dict = {}
        t0 = time.perf_counter()
        try:
            ov = caption_overrides(name) + [f"train.steps={steps}", "train.log_every=1", f"train.ckpt_every={steps}",
                                            "train.warmup_steps=2", "train.seed=0"]
            if a.smoke:
                ov += ["data.batch_size=16", "data.num_workers=0"]
            recipe = load_recipe(name, overrides=ov)
            with tempfile.TemporaryDirectory() as d, time_box(per):
                pretrain(recipe, d, device=a.device, progress=False)
                lines = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines() if x.strip()]
            batch = recipe.data.batch_size
            first = lines[min(4, len(lines) - 2)] if len(lines) > 1 else lines[0]
            end = lines[-1]
            t_first, t_end = first["step"] * batch / first["img_per_s"], end["step"] * batch / end["img_per_s"]
            rate = (end["step"] - first["step"]) * batch / (t_end - t_first) if t_end > t_first else end["img_per_s"]
            row.update(ok=True, img_per_s=rate, batch=batch, img_size=recipe.data.image_size,
                       backbone=recipe.backbone.name, final_loss=end["loss"],
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


def vit_recipe(a):
    from m3i.config import load_recipe

    if a.smoke:
        ov = ["backbone.name=vit_micro", "backbone.depth=2", "backbone.img_size=32", "backbone.patch_size=4",
              "data.image_size=32", "data.batch_size=16"]
    else:
        ov = ["backbone.name=vit_base", "backbone.img_size=224", "backbone.patch_size=16", "data.image_size=224",
              f"data.batch_size={a.vit_batch}"]
    return load_recipe("m3i", overrides=ov + caption_overrides("m3i") + ["train.precision=bf16", "train.steps=1000"])


def section_vit(a, part: dict, save, compile_: bool = False) -> None:
    """The m3i step on one real batch held on the device: eager or compiled, bf16 autocast."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from m3i.objective import Objective
    from m3i.train.loop import build_mixture, lr_lambda
    from m3i.train.step import BadSteps, TrainStep, make_optimizer
    from m3i.train.strategy import compile_backbones

    dev = torch.device(a.device)
    recipe = vit_recipe(a)
    tr = recipe.train
    mixture = build_mixture(recipe)
    cpu_batch = next(iter(mixture))
    torch.manual_seed(0)
    objective = Objective(recipe, mixture.num_classes).to(dev)
    n_params = sum(p.numel() for p in objective.backbone.parameters())
    opt = make_optimizer(objective.param_groups(tr.weight_decay), tr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr))
    batch = dict(cpu_batch, image=cpu_batch["image"].to(dev), label=cpu_batch["label"].to(dev))
    bsz = batch["image"].shape[0]
    part.update(model="ViT-B/16" if not a.smoke else "vit_micro (smoke)", img_size=recipe.backbone.img_size,
                batch=bsz, precision="bf16", backbone_params=n_params, compile=compile_,
                terms=[t.name for t in recipe.terms])
    if compile_:  # before the step holds its parameter lists, as in the trainer
        part["compiled_units"] = compile_backbones(objective)
    # the trainer's own step (m3i.train.step): views, masks, every term, backward, clip, AdamW, EMA
    train_step = TrainStep(objective, objective, opt, sched, tr, torch.autocast(dev.type, dtype=torch.bfloat16),
                           BadSteps(dev))
    step_no = [0]

    def step():
        out = train_step(batch, step_no[0])
        step_no[0] += 1
        return out["loss"]

    if compile_:
        t0 = time.perf_counter()
        step()
        sync(dev)
        part["first_step_s"] = time.perf_counter() - t0  # compile time included
        print(f"compiled step 1: {part['first_step_s']:.1f} s", flush=True)
        save()
    else:
        # model FLOPs of one step (forward + backward of everything the step computes), counted eagerly
        step()
        if dev.type == "cuda":  # where the step makes the host wait for the GPU
            import warnings
            from collections import Counter

            sync(dev)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
            part.update(host_syncs_per_step=sum(sites.values()), host_sync_sites=dict(sites.most_common(20)))
            print(f"host syncs in one step: {sum(sites.values())} {dict(sites.most_common(8))}", flush=True)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        part["flops_per_step"] = counter.get_total_flops()
        part["gflops_per_image"] = part["flops_per_step"] / bsz / 1e9
        save()
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
    part.update(step_s=dt, img_per_s=bsz / dt, loss_finite=all(math.isfinite(float(x.detach())) for x in losses))
    if dev.type == "cuda":
        part["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    print(f"ViT step ({'compiled' if compile_ else 'eager'}): {bsz / dt:.0f} img/s, {dt * 1e3:.0f} ms/step"
          + (f", peak {part['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in part else ""), flush=True)


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
    ov = caption_overrides("m3i") + ["backbone.name=vit_micro", "backbone.patch_size=4", "train.steps=10",
                                     "train.log_every=1", "train.warmup_steps=2"]
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
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    part.update(steps=lines[-1]["step"], img_per_s=lines[-1]["img_per_s"],
                loss_finite=all(math.isfinite(x["loss"]) for x in lines))
    fsdp = Path(str(out) + "_fsdp") / "metrics.jsonl"
    if fsdp.is_file():
        f = [json.loads(x) for x in fsdp.read_text().splitlines() if x.strip()]
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

    try:
        if a.section == "peak":
            section_peak(a, part, save)
        elif a.section == "recipes":
            section_recipes(a, part, save)
        elif a.section in ("vit", "vit_compile"):
            section_vit(a, part, save, compile_=a.section == "vit_compile")
        elif a.section == "ddp":
            section_ddp(a, part, save)
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
    peak = res["sections"].get("peak", {}).get("bf16_matmul_tflops")
    for key in ("vit", "vit_compile"):
        s = res["sections"].get(key, {})
        flops = s.get("flops_per_step") or res["sections"].get("vit", {}).get("flops_per_step")
        if s.get("img_per_s") and flops and peak:
            s["mfu"] = flops / s["step_s"] / (peak * 1e12)
            s["achieved_tflops"] = flops / s["step_s"] / 1e12


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
        if name.startswith("vit") and "img_per_s" in s:
            print(f"{name:<12} {s['img_per_s']:7.0f} img/s  {s['step_s'] * 1e3:6.0f} ms/step"
                  + (f"  peak {s['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in s else "")
                  + (f"  MFU {100 * s['mfu']:.1f} % ({s['achieved_tflops']:.0f} TFLOP/s)" if "mfu" in s else "")
                  + (f"  first step {s['first_step_s']:.0f} s" if "first_step_s" in s else ""))
        if name == "ddp" and s.get("ok"):
            print(f"{name:<12} backend {s['backend']}, {s['wrap']}, {s['steps']} steps, {s['img_per_s']:.0f} img/s; "
                  + (f"FSDP {s['fsdp_steps']} steps, {s['fsdp_img_per_s']:.0f} img/s" if "fsdp_steps" in s
                     else f"FSDP ERROR {s.get('fsdp_error')}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "gpu.json"))
    p.add_argument("--smoke", action="store_true", help="tiny models and steps on the CPU: checks the script runs")
    p.add_argument("--device", help="default: cuda (cpu with --smoke)")
    p.add_argument("--tokenizer", help="folder holding the MiniLM tokenizer.json (sets $M3I_TOKENIZER)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--recipes", nargs="+", help="default: every recipe")
    p.add_argument("--recipe-steps", type=int, default=None, help="default 20 (3 with --smoke)")
    p.add_argument("--vit-batch", type=int, default=256)
    p.add_argument("--budget", type=float, default=470, help="seconds for the whole check")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=600, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.recipe_steps = a.recipe_steps or (3 if a.smoke else 20)
    if a.tokenizer:
        os.environ["M3I_TOKENIZER"] = str(Path(a.tokenizer).resolve())
    # this checkout's m3i first, in this process and in every section's
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    sys.path.insert(0, str(ROOT / "src"))
    if a.section:
        return run_section(a)

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
            if limit < 15:
                res["sections"][name] = {"ok": False, "error": f"skipped: {left:.0f} s of the budget left"}
                write()
                continue
            part = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--section", name, "--part", str(part), "--limit", str(limit),
                   "--tmp", tmp, "--device", a.device, "--recipe-steps", str(a.recipe_steps),
                   "--vit-batch", str(a.vit_batch)] + (["--smoke"] if a.smoke else []) + (
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
            res["sections"][name] = got
            write()
    write()
    print_table(res)
    print(f"\nwrote {out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
