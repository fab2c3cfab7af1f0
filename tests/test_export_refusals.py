"""`m3i export` refuses with one line that says what to do, before any work, and leaves the disk as
it was: no folder made for an output that is never written, no earlier export moved aside for
an export that is refused; an export given where a run is expected is named as one. A pt2
export prints nothing on stderr."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import HANG
from faults.faultkit import image_folder
from m3i import export as export_module
from m3i.cli import main
from m3i.config import load_recipe
from m3i.train import loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SMALL = ["data.batch_size=4", "data.num_workers=0", "train.warmup_steps=1", "train.steps=1", "train.precision=fp32",
         "terms.0.decoder.projector=[32, 16]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-step SimCLR run of the demo's ResNet (no timm layout) and one of a ViT (timm layout), on
    a folder of random images; a run that has no checkpoint yet."""
    root = tmp_path_factory.mktemp("runs")
    image_folder(root / "data", per_class=4, size=32)
    data = f"data.sources=[{{spec: 'folder:{root / 'data'}'}}]"
    for name, backbone in (("resnet", ["backbone.name=resnet_nano"]), ("vit", ["backbone.name=vit_nano", "backbone.depth=1"])):
        loop.pretrain(load_recipe("simclr", overrides=SMALL + [data, *backbone]), root / name, progress=False)
    (root / "unstarted").mkdir()
    (root / "unstarted" / "config.yaml").write_text((root / "vit" / "config.yaml").read_text())
    return root


def export(capfd, *args) -> tuple[int, str]:
    """``m3i export ARGS``: the exit status and everything written on stderr (file descriptor 2:
    torch's own log lines too)."""
    code = main(["export", *map(str, args)])
    return code, capfd.readouterr().err


def files(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (folders as None), with the contents of the files."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("fmt, out", [("timm", "new/backbone.safetensors"), ("timm-dir", "new/backbone")])
def test_a_backbone_without_timm_layout_is_pointed_to_pt2_and_the_hint_works(runs, tmp_path, capfd, fmt, out):
    code, err = export(capfd, "--checkpoint", runs / "resnet", "--format", fmt, "--out", tmp_path / out)
    pt2 = (tmp_path / out).with_suffix(".pt2")
    assert code == 2
    assert err.strip() == (
        f"m3i export: error: --format {fmt}: backbone resnet_nano has no timm layout (only vit_*, convnext_* and "
        f"timm/<model> backbones have one); --format pt2 exports any backbone as a program plain PyTorch runs: "
        f"m3i export --checkpoint {runs / 'resnet'} --format pt2 --out {pt2}")
    assert list(tmp_path.iterdir()) == []  # not even the folder new/
    # the command the hint gives works, and prints nothing but where it wrote
    hint = err.strip().split(": m3i export ")[1].split()
    code, err = export(capfd, *hint)
    assert (code, err) == (0, "")
    features = torch.export.load(str(pt2)).module()(torch.rand(3, 3, 32, 32))
    assert features.shape == (3, 128)  # resnet_nano's width


def test_pt2_export_prints_no_warning_and_leaves_only_its_file(runs, tmp_path):
    """In a child process: what a user's terminal shows (under pytest, torch's log lines go to
    pytest's log capture instead)."""
    out = tmp_path / "a" / "vit.pt2"
    proc = subprocess.run([sys.executable, "-m", "m3i.cli", "export", "--checkpoint", str(runs / "vit"), "--format", "pt2",
                           "--out", str(out)], capture_output=True, text=True, check=False, timeout=HANG,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"wrote {out}\n", "")
    assert sorted(files(tmp_path)) == ["a", "a/vit.pt2"]
    extra = {"m3i.json": ""}
    torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["m3i.json"])["backbone"] == "vit_nano"


def refusals(runs: Path, tmp: Path) -> list[tuple[list, str]]:
    """(arguments, the one line of the refusal)."""
    ckpt = runs / "vit" / "checkpoints" / "step_000001"
    return [
        (["--checkpoint", runs / "nowhere", "--format", "pt2", "--out", tmp / "x.pt2"],
         f"{runs / 'nowhere'}: no such run or checkpoint directory"),
        (["--checkpoint", runs / "unstarted", "--format", "pt2", "--out", tmp / "x.pt2"],
         f"{runs / 'unstarted'}: holds no checkpoint (expected model.safetensors or checkpoints/latest)"),
        (["--checkpoint", runs / "vit", "--format", "timm", "--out", tmp / "x.pt2"],
         f"--out {tmp / 'x.pt2'}: expected a .safetensors file name for --format timm"),
        (["--checkpoint", runs / "vit", "--format", "timm-dir", "--out", tmp / "x.safetensors"],
         f"--out {tmp / 'x.safetensors'}: expected a folder for --format timm-dir"),
        # a file of the user's own is never moved aside, --overwrite or not
        (["--checkpoint", runs / "vit", "--format", "timm", "--out", tmp / "mine.safetensors", "--overwrite"],
         f"--out {tmp / 'mine.safetensors'}: holds a file that is not an m3i export; choose another --out"),
        (["--checkpoint", runs / "vit", "--format", "timm-dir", "--out", tmp / "notes", "--overwrite"],
         f"--out {tmp / 'notes'}: the folder holds files other than an export's (config.json, model.safetensors, "
         f"README.md); give a new or empty folder"),
        (["--checkpoint", runs / "vit", "--format", "timm", "--out", ckpt / "model.safetensors", "--overwrite"],
         f"--out {ckpt / 'model.safetensors'}: holds a file that is not an m3i export; choose another --out"),
        (["--checkpoint", runs / "vit", "--format", "pt2", "--out", ckpt.parent / "vit.pt2"],
         f"--out {ckpt.parent / 'vit.pt2'}: inside {ckpt.parent}, where the run keeps its checkpoints; "
         f"choose another --out"),
        (["--checkpoint", runs / "vit", "--format", "pt2", "--out", tmp / "mine.safetensors" / "x.pt2"],
         f"--out {tmp / 'mine.safetensors' / 'x.pt2'}: cannot write into {tmp / 'mine.safetensors'} (Not a directory); "
         f"choose a folder you can write to"),
    ]


def test_every_refusal_is_one_line_and_touches_nothing(runs, tmp_path, capfd):
    (tmp_path / "mine.safetensors").write_bytes(b"the user's own")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    before, run_before = files(tmp_path), files(runs)
    for args, line in refusals(runs, tmp_path):
        code, err = export(capfd, *args)
        assert (code, err.strip()) == (2, f"m3i export: error: {line}"), args
    assert files(tmp_path) == before and files(runs) == run_before
    with pytest.raises(SystemExit) as e:  # argparse's own refusal of an unknown format
        main(["export", "--checkpoint", str(runs / "vit"), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    assert e.value.code == 2 and "argument --format: invalid choice: 'onnx'" in capfd.readouterr().err


def test_an_export_given_for_a_run_is_named_with_what_loads_it(runs, tmp_path, capfd):
    """Every command that loads a run says an export is not one (it used to say to remove the
    export's README.md, as if the folder were a checkpoint holding a stray file)."""
    made = {"timm-dir": tmp_path / "vit", "timm": tmp_path / "vit.safetensors", "pt2": tmp_path / "vit.pt2"}
    for fmt, out in made.items():
        assert export(capfd, "--checkpoint", runs / "vit", "--format", fmt, "--out", out) == (0, "")
    loads = {"timm-dir": f"timm.create_model('local-dir:{made['timm-dir']}', pretrained=True) builds it",
             "timm": "timm's weights of one model", "pt2": f"torch.export.load('{made['pt2']}').module() runs it"}
    for fmt, out in made.items():
        why = f"{out}: an m3i export (--format {fmt}; {loads[fmt]}), not a run or checkpoint; give the run folder it was exported from"
        assert export(capfd, "--checkpoint", out, "--format", "pt2", "--out", tmp_path / "again.pt2") == (2, f"m3i export: error: {why}\n")
        code = main(["eval", "--checkpoint", str(out), "--task", "knn", "--dataset", f"folder:{runs / 'data'}", "--device", "cpu",
                     "--no-progress"])
        assert (code, capfd.readouterr().err) == (2, f"m3i eval: error: {why}\n")
    assert not (tmp_path / "again.pt2").exists()


def test_an_unfinished_run_exports_its_newest_checkpoint_and_the_card_says_which(runs, tmp_path, capfd):
    run = tmp_path / "unfinished"
    shutil.copytree(runs / "vit", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["steps"] = 5  # the run asks for 5 steps; its newest checkpoint is step 1
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert export(capfd, "--checkpoint", run, "--format", "timm-dir", "--out", tmp_path / "vit") == (0, "")
    assert "(simclr recipe, step 1 of 5, 32×32 px)" in (tmp_path / "vit" / "README.md").read_text()
    assert export(capfd, "--checkpoint", runs / "vit", "--format", "timm-dir", "--out", tmp_path / "done") == (0, "")
    assert "(simclr recipe, 1 steps, 32×32 px)" in (tmp_path / "done" / "README.md").read_text()


def test_a_full_disk_while_writing_leaves_nothing_behind(runs, tmp_path, capfd, monkeypatch):
    """The device fills up half-way through the weights: one line, and neither the half-written
    folder nor the folders made for it are left."""
    real = export_module.save_file

    def disk_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(export_module, "save_file", disk_full)
    out = tmp_path / "new" / "vit"
    code, err = export(capfd, "--checkpoint", runs / "vit", "--format", "timm-dir", "--out", out)
    assert (code, err.strip()) == (2, f"m3i export: error: --out {out}: could not be written (No space left on device); "
                                      f"free some space or choose another folder")
    assert files(tmp_path) == {}


def test_a_refused_export_with_overwrite_keeps_the_earlier_export_in_place(runs, tmp_path, capfd):
    out = tmp_path / "vit.pt2"
    assert export(capfd, "--checkpoint", runs / "vit", "--format", "pt2", "--out", out)[0] == 0
    before = files(tmp_path)
    code, err = export(capfd, "--checkpoint", runs / "nowhere", "--format", "pt2", "--out", out, "--overwrite")
    assert (code, err) == (2, f"m3i export: error: {runs / 'nowhere'}: no such run or checkpoint directory\n")
    assert files(tmp_path) == before
