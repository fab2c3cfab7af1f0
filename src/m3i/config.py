"""Recipes: YAML files validated into one schema, with file and command-line overrides.

A recipe names the backbone, the views, the data mix, the training schedule and the list of
mutual-information terms. Every mistake is reported as ``FILE: field.path: what is expected``.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from . import plugins
from .backbones import BackboneCfg, build_backbone, input_modes
from .backbones.registry import registered_by
from .decoders import DECODERS
from .decoders.mlp import GlobalDecoderCfg
from .encoders import TARGET_ENCODERS
from .estimators import ESTIMATORS
from .registry import Registry, did_you_mean
from .schema import ConfigError, Strict, union_of
from .targets import TARGETS
from .views.stage import check_local_views

RECIPE_DIR = Path(__file__).parent / "recipes"
# the parts a term is made of: the field of each, and the registry of its kinds
PARTS: dict[str, Registry] = {"target": TARGETS, "target_encoder": TARGET_ENCODERS, "decoder": DECODERS,
                              "estimator": ESTIMATORS}
PART_FIELDS = tuple(PARTS)


def part_configs() -> dict[str, dict[str, type[BaseModel]]]:
    """Per part field, the settings class of each registered kind (plugins' kinds included)."""
    return {f: reg.by_kind() for f, reg in PARTS.items()}


class AugmentCfg(Strict):
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    # the normalisation of the backbone's input (ImageNet's for the recipes at 224 px)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


class MaskCfg(Strict):
    kind: Literal["block", "random"] = "block"
    # the share of a masked view's patches hidden: a number (every masked image hides as many), or
    # [lo, hi] (DINOv2: the masked images of a batch hide shares spread evenly over the range)
    ratio: float | tuple[float, float] = 0.6
    # the share of a batch's masked-view images that are masked at all (DINOv2: 0.5); the rest show every patch
    probability: float = Field(1.0, ge=0.0, le=1.0)
    # the smallest rectangle of a block mask, in patches (BEiT and SIM: 16 at 14 × 14)
    min_block: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _ratio_range(self):
        lo, hi = self.ratio_range
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"ratio: a share of the patches in [0, 1), or [lo, hi] with 0 <= lo <= hi < 1, "
                             f"got {list(self.ratio) if isinstance(self.ratio, tuple) else self.ratio}")
        return self

    @property
    def ratio_range(self) -> tuple[float, float]:
        """``(lo, hi)`` of the hidden share; ``(r, r)`` for a number."""
        return tuple(self.ratio) if isinstance(self.ratio, tuple) else (self.ratio, self.ratio)

    @property
    def varies(self) -> bool:
        """Whether masked images hide different numbers of patches (a ratio range, or some images
        unmasked): only the ``fill`` input takes such masks."""
        lo, hi = self.ratio_range
        return lo != hi or self.probability < 1.0


class LocalViewsCfg(Strict):
    """Multi-crop's local crops (DINO): small crops that only the online encoder sees."""

    count: int = Field(8, ge=1)
    # their side in pixels (a multiple of the backbone's patch size); the global views are backbone.img_size
    size: int = Field(96, ge=1)
    augment: AugmentCfg = AugmentCfg(crop_scale=(0.05, 0.32))


class ViewsCfg(Strict):
    # the global views (crops at backbone.img_size); with ``local``, the local crops follow them
    count: int = Field(2, ge=1, le=8)
    augment: list[AugmentCfg] = Field(default_factory=lambda: [AugmentCfg()])
    local: LocalViewsCfg | None = None
    mask: MaskCfg = MaskCfg()
    input_mode: Literal["drop", "mix", "fill"] = "drop"

    @model_validator(mode="after")
    def _augment_per_view(self):
        if len(self.augment) not in (1, self.count):
            raise ValueError(f"augment: give one entry for all views or one per view ({self.count}), got {len(self.augment)}")
        if self.local is not None:  # the backbone's input is normalised alike in every crop
            aug, own = self.local.augment, self.local.augment.model_fields_set
            for stat in ("mean", "std"):
                ref = getattr(self.augment[0], stat)
                if stat not in own:
                    setattr(aug, stat, ref)
                elif getattr(aug, stat) != ref:
                    raise ValueError(f"local.augment.{stat}: the local crops are normalised as the global views, "
                                     f"{list(ref)}, got {list(getattr(aug, stat))}; leave it out")
        lo, hi = self.mask.ratio_range
        if self.mask.varies and self.input_mode != "fill":
            why = f"ratio: a range [{lo}, {hi}]" if lo != hi else \
                f"probability: {self.mask.probability} leaves some images unmasked and"
            raise ValueError(f"mask.{why} makes images hide different numbers of patches, which only input_mode fill "
                             f"takes (a mask token in place of each hidden patch), not {self.input_mode!r}")
        if self.input_mode == "mix" and "ratio" in self.mask.model_fields_set and (lo, hi) != (0.5, 0.5):
            raise ValueError(f"mask.ratio: the 'mix' input shows each image on half of the patches (ratio 0.5), "
                             f"so it cannot take {self.mask.ratio}; use input_mode drop or fill for another ratio")
        return self

    @property
    def total(self) -> int:
        """Every view of a sample: the global views, then the local crops."""
        return self.count + (self.local.count if self.local else 0)

    def global_views(self) -> list[int]:
        return list(range(self.count))

    def local_views(self) -> list[int]:
        return list(range(self.count, self.total))

    def augment_for(self, view: int) -> AugmentCfg:
        if view >= self.count:
            return self.local.augment
        return self.augment[view if len(self.augment) > 1 else 0]

    def size_of(self, view: int, img_size: int) -> int:
        """The side in pixels of ``view`` for a backbone of ``img_size``."""
        return self.local.size if view >= self.count else img_size


class SourceCfg(Strict):
    spec: str
    weight: float = Field(1.0, gt=0)
    labels: bool = True
    captions: bool = True
    # the number of samples, as published, for `m3i pretrain --dry-run` where the source is not at hand
    size: int | None = Field(None, ge=1)


def builtin_mix() -> list[SourceCfg]:
    """The built-in mix: Fashion-MNIST with labels, emoji with captions, both also unlabelled;
    the train part of each (``m3i.data.splits``), so evaluation's test items are never seen."""
    return [
        SourceCfg(spec="fashion-mnist:train", weight=0.4, captions=False),
        SourceCfg(spec="emoji:train", weight=0.3, labels=False),
        SourceCfg(spec="fashion-mnist:train", weight=0.15, labels=False, captions=False),
        SourceCfg(spec="emoji:train", weight=0.15, labels=False, captions=False),
    ]


class DataCfg(Strict):
    sources: list[SourceCfg] = Field(default_factory=builtin_mix, min_length=1)
    image_size: int = 32
    batch_size: int = Field(128, ge=2)
    num_workers: int = Field(2, ge=0)
    # the largest fraction of a source's samples that may be unusable (unreadable images, bad
    # manifest rows); more stops the run with a message naming the source
    max_lost: float = Field(0.1, ge=0.0, le=1.0)
    # a read that fails with an I/O error is tried again this many times, after retry_backoff
    # seconds, doubled each time; then its slot alone is replaced from the slot's own stream
    read_retries: int = Field(3, ge=0)
    retry_backoff: float = Field(0.1, ge=0.0)


class TrainCfg(Strict):
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    # the learning rate per 256 images (MAE, SIM): lr = blr · data.batch_size / 256
    blr: float | None = Field(None, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = Field(None, ge=0)  # default: a tenth of the steps
    clip_grad: float = 1.0
    # auto: bf16 where the device has bfloat16 kernels, else fp16 on a GPU and fp32 on a CPU
    # (m3i.device); fp16: autocast to float16 with a gradient scaler (GPUs without bfloat16),
    # the steps it skips (gradients that overflowed) counting as skipped steps
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(200, ge=1)
    max_bad_steps: int = Field(10, ge=1)
    # micro-batches per optimiser step: the gradient of data.batch_size from micro-batches of
    # data.batch_size / (ranks · accum_steps), exactly, contrastive and UniGrad terms included
    # (m3i.train.accumulation: one extra forward without gradient)
    accum_steps: int = Field(1, ge=1)
    # torch.compile every block (ViT) or stage block (ConvNeXt) of the backbones, and the decoders' blocks
    compile: bool = False
    # several processes (torchrun): ddp replicates the model, fsdp shards it (FSDP2, per block / stage)
    # over every rank, hsdp shards it within each group of ranks (a node) and replicates it across groups
    strategy: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    # hsdp's device mesh [replicas, shards] (replicas × shards = the ranks); default: the launch's,
    # $LOCAL_WORLD_SIZE shards (the ranks of a node) × the nodes
    mesh: tuple[int, int] | None = None
    # monitors (m3i.eval.monitor): every eval_every steps (0: never) k-NN on the val split of
    # eval_knn and retrieval on that of eval_retrieval (default: the built-in sources of the mix),
    # at most eval_limit fit images and eval_limit / 4 val images
    eval_every: int = Field(0, ge=0)
    eval_knn: str | None = None
    eval_retrieval: str | None = None
    eval_limit: int = Field(2000, ge=4)
    # experiment trackers beside metrics.jsonl (m3i.train.trackers); wandb and mlflow are extras
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])

    @model_validator(mode="after")
    def _schedule(self):
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        # a warm-up longer than the run is taken (cut short, or scaled with --steps: load_recipe)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr:g} is above train.lr={self.lr:g}; the schedule decays from lr to min_lr")
        if self.mesh is not None and min(self.mesh) < 1:
            raise ValueError(f"mesh: {list(self.mesh)}: expected [replicas, shards], each a whole number >= 1")
        if self.mesh is not None and self.strategy != "hsdp":
            raise ValueError(f"mesh: {list(self.mesh)} is the device mesh of train.strategy=hsdp; the strategy is "
                             f"{self.strategy}")
        return self


class EMACfg(Strict):
    momentum: float = Field(0.996, ge=0, le=1)
    end: float = Field(1.0, ge=0, le=1)


class SourceViewCfg(Strict):
    view: int = Field(0, ge=0, le=1)
    masked: bool = False


class TermCfg(Strict):
    """One term: a source view, and the four parts, each settings class picked by its ``kind``
    (its fields are those of that kind alone)."""

    name: str
    weight: float = Field(1.0, ge=0)  # λ_k; 0 leaves the term out of the loss
    source: SourceViewCfg = SourceViewCfg()
    # unions over the registries, resolved when the schema is built (recipe_schema)
    target: TargetUnion  # noqa: F821
    target_encoder: TargetEncoderUnion  # noqa: F821
    decoder: DecoderUnion = GlobalDecoderCfg()  # noqa: F821
    estimator: EstimatorUnion  # noqa: F821
    swap_views: bool = False

    @model_validator(mode="after")
    def _parts_fit(self):
        TARGETS[self.target.kind].check(self)
        return self


class Recipe(Strict):
    name: str
    description: str = ""
    # modules imported before the recipe is validated (their parts register themselves); a run's
    # config.yaml lists every module outside m3i whose parts it uses
    plugins: list[str] = Field(default_factory=list)
    backbone: BackboneCfg = BackboneCfg()
    views: ViewsCfg = ViewsCfg()
    data: DataCfg = DataCfg()
    train: TrainCfg = TrainCfg()
    ema: EMACfg = EMACfg()
    terms: list[TermCfg] = Field(min_length=1)

    @model_validator(mode="after")
    def _views_exist(self):
        for i, t in enumerate(self.terms):
            used = TARGETS[t.target.kind].views(t, self.views)
            if max(used) >= self.views.total:
                raise ValueError(f"terms.{i}.target.view: term {t.name!r} uses view {max(used)} but the recipe has "
                                 f"{self.views.total} (views.count{' + views.local.count' if self.views.local else ''})")
        for i, t in enumerate(self.terms):
            local = sorted(v for v in TARGETS[t.target.kind].masked_views(t, self.views) if v >= self.views.count)
            if local:
                raise ValueError(f"terms.{i}: term {t.name!r} sees view {local[0]} masked, a local crop (views.count is "
                                 f"{self.views.count}); masks sit on the global views only")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"terms: names must be unique, got {names}")
        for i, t in enumerate(self.terms):
            try:
                TARGETS[t.target.kind].check_views(t, self.views)
            except ValueError as e:
                raise ValueError(f"terms.{i}.{e}") from None
        modes = input_modes(self.backbone.name)
        if any(t.source.masked for t in self.terms) and self.views.input_mode not in modes:
            takes = f"masked views as {' or '.join(repr(m) for m in modes)}" if modes else \
                "no masked views (plain views only: set source.masked false)"
            raise ValueError(f"views.input_mode: {self.backbone.name} takes {takes}, not {self.views.input_mode!r}")
        if self.views.input_mode == "mix" and self.data.batch_size % 2:
            raise ValueError(f"data.batch_size: the 'mix' input pairs images, so it must be even, got {self.data.batch_size}")
        check_accum_steps(self.train.accum_steps, self.data.batch_size, 1, self.views.input_mode == "mix")
        # one image size given: the other follows it (both given: images are read at one, views made at the other)
        given = {"image_size" in self.data.model_fields_set, "img_size" in self.backbone.model_fields_set}
        if given == {True, False}:
            if "image_size" in self.data.model_fields_set:
                self.backbone.img_size = self.data.image_size
            else:
                self.data.image_size = self.backbone.img_size
        _check_local_views(self)
        tr = self.train
        if tr.blr is not None:
            lr = tr.blr * self.data.batch_size / 256
            if "lr" in tr.model_fields_set and abs(tr.lr - lr) > 1e-9 * lr:
                raise ValueError(f"train.lr: {tr.lr} is given beside train.blr {tr.blr}, which makes it {lr:g} at "
                                 f"data.batch_size {self.data.batch_size}; give one of them")
            if tr.min_lr > lr:
                raise ValueError(f"train.min_lr: {tr.min_lr:g} is above the lr {lr:g} train.blr {tr.blr} makes at "
                                 f"data.batch_size {self.data.batch_size}; the schedule decays from lr to min_lr")
            tr.lr = lr
        return self


def _check_local_views(recipe: Recipe) -> None:
    """Refuse local crops (``views.local``) the backbone cannot take (a size that is no multiple of
    its patch size; a timm model built for one input size), against the backbone built on the meta
    device. Settings the backbone itself refuses are reported where it is built."""
    if recipe.views.local is None:
        return
    try:
        with torch.device("meta"):
            net = build_backbone(recipe.backbone.name, **recipe.backbone.kwargs())
    except Exception:  # noqa: BLE001
        return
    check_local_views(recipe.views, net)


_built = -1  # the registries' version the schema was last built from


def recipe_schema() -> type[Recipe]:
    """The recipe schema over every registered part: the plugins named by ``M3I_PLUGINS`` and the
    ``m3i.parts`` entry points are imported first; rebuilt whenever a part was registered since."""
    global _built
    plugins.load_configured()
    if _built != Registry.version:
        TermCfg.model_rebuild(force=True, _types_namespace={
            "TargetUnion": union_of(TARGETS.configs()), "TargetEncoderUnion": union_of(TARGET_ENCODERS.configs()),
            "DecoderUnion": union_of(DECODERS.configs(), default="global"),
            "EstimatorUnion": union_of(ESTIMATORS.configs())})
        Recipe.model_rebuild(force=True)
        _built = Registry.version
    return Recipe


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file not found")
        return p
    p = RECIPE_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}{did_you_mean(name_or_path, recipe_names())}; expected one "
                          f"of {', '.join(recipe_names())} or a .yaml file")
    return p


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def _printable(part) -> str:
    """A key as messages show it: quoted when it holds line breaks or other unprintable characters."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _one_line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_override(data: dict, item: str) -> dict:
    """Apply one ``dotted.key=value`` (value parsed as YAML); list items by index (terms.0.weight=2)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    if parts == ["backbone"] and isinstance(value, str):  # shorthand: backbone=convnext_atto
        parts = ["backbone", "name"]
    data = copy.deepcopy(data)
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {item!r}: {where} is not an index of a list of {len(node)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                if parts[depth + 1].isdigit():
                    raise ConfigError(f"override {item!r}: {where} is not set in this recipe (it has its default), "
                                      f"so it has no item {parts[depth + 1]}; give the whole list, e.g. "
                                      f"{where}=[{{{parts[depth + 2] if depth + 2 < len(parts) else 'spec'}: {raw}}}]")
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override {item!r}: {where} is a value, not a group of settings")
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is a value, not a group of settings")
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise ConfigError(f"override {item!r}: {last} is not an index of a list of {len(node)} "
                              f"(or {len(node)} to append)")
        if int(last) == len(node):  # terms.3={...} adds a fourth term
            node.append(value)
        else:
            node[int(last)] = value
    else:
        node[last] = value
    return data


_FIELD_FIRST = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.S)


def _where(loc: tuple) -> tuple[list[str], str | None]:
    """A pydantic error location as the recipe spells it, and the kind of part it lies in: the
    kind that picked a part's settings class (``terms.0.estimator.boltzmann.temperature``) is not
    a key of the file."""
    out: list[str] = []
    kind = None
    kinds = {k for reg in PARTS.values() for k in reg.kinds()}
    for i, part in enumerate(loc):
        if i and loc[i - 1] in PART_FIELDS and part in kinds:
            kind = part
            continue
        out.append(_printable(part))
    return out, kind


def validate(data: dict, origin: str, schema: type[BaseModel] | None = None):
    """``data`` as a ``schema`` (a recipe by default), every mistake one ``origin: field: expectation`` line."""
    recipe_schema()
    schema = schema or Recipe
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError("; ".join(f"{origin}: {_mistake(err, schema)}" for err in e.errors())) from None


def _mistake(err: dict, schema: type[BaseModel]) -> str:
    """One pydantic error as ``field: expectation``, with the closest valid name to a misspelt one."""
    loc, kind = _where(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + (f" (not a setting of kind {kind!r})" if kind else "") + \
            did_you_mean(err["loc"][-1], _keys_at(schema, err["loc"]))
    elif err["type"] == "union_tag_invalid":
        kinds = PARTS[loc[-1]].kinds() if loc and loc[-1] in PARTS else []
        loc.append("kind")
        msg = f"expected one of {err['ctx']['expected_tags']} (got {err['ctx']['tag']!r})" + \
            did_you_mean(err["ctx"]["tag"], kinds)
    elif err["type"] == "union_tag_not_found":
        loc.append("kind")
        msg = "missing: every part names its kind" if isinstance(err["input"], dict) else \
            f"expected a mapping of settings with a kind, got {err['input']!r}"
    elif err["type"] == "value_error" and (m := _FIELD_FIRST.match(msg)):
        loc.append(m.group(1))  # a check that names its field: "width: 100 is not ..."
        msg = m.group(2)
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
        if err["type"] == "literal_error" and isinstance(err["input"], str):
            msg += did_you_mean(err["input"], re.findall(r"'([^']*)'", err["ctx"]["expected"]))
    return f"{'.'.join(loc) or '(top level)'}: {msg}"


def _keys_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the settings holding ``loc``'s last key take (none where the path leaves the schema)."""
    model: type[BaseModel] | None = schema
    path = [p for p in loc[:-1] if not isinstance(p, int)]
    for i, part in enumerate(path):
        picked = part_configs().get(path[i - 1], {}).get(part) if i else None  # a part's kind picks its settings
        field = model.model_fields.get(part) if model is not None else None
        model = picked or (_model_in(field.annotation) if field is not None else None)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation) -> type[BaseModel] | None:
    """The settings class inside a field's type (``list[TermCfg]``, ``MaskCfg | None``, a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _model_in(a)) is not None), None)


def upgrade_saved(data: dict) -> dict:
    """A run's saved config written before every part had settings of its own kind: then each part
    listed the fields of every kind, a dense view was ``{kind: view, dense: true}``, and the mixed
    input ignored ``views.mask.ratio``. Returns the same run in today's form."""
    data = copy.deepcopy(data)
    for term in data.get("terms") or []:
        if not isinstance(term, dict):
            continue
        target = term.get("target")
        if isinstance(target, dict) and target.get("kind") == "view" and target.pop("dense", False):
            target["kind"] = "dense_view"
        decoder = term.get("decoder")
        if isinstance(decoder, dict) and decoder.get("kind") == "dense" and "projector" in decoder:
            decoder.pop("norm", None)  # the global decoder's norm; the old dense decoder always used LayerNorm
        for field, by_kind in part_configs().items():
            part = term.get(field)
            if isinstance(part, dict) and part.get("kind") in by_kind:
                known = by_kind[part["kind"]].model_fields
                term[field] = {k: v for k, v in part.items() if k in known}
    views = data.get("views")
    if isinstance(views, dict) and views.get("input_mode") == "mix" and isinstance(views.get("mask"), dict):
        views["mask"]["ratio"] = 0.5
    return data


def load_recipe(name_or_path: str, config: str | None = None, overrides: list[str] = (),
                saved: bool = False) -> Recipe:
    """Recipe file, then an optional config file merged over it, then key=value overrides.
    ``saved``: the file is a run's own config.yaml, perhaps written by an earlier m3i."""
    path = recipe_path(name_or_path)
    data = _read_yaml(path)
    origin = str(path)
    own_train = data["train"] if isinstance(data.get("train"), dict) else {}
    plugins.load_named(data.get("plugins"), f"{origin}: plugins")  # before the schema is built from the registries
    if saved:
        data = upgrade_saved(data)
    config_data = {}
    if config:
        cpath = Path(config)
        if not cpath.is_file():
            raise ConfigError(f"{cpath}: config file not found")
        config_data = _read_yaml(cpath)
        data = merge(data, config_data)
        origin += f" + {cpath}"
    for item in overrides:
        data = apply_override(data, item)
    if overrides:
        origin += " + overrides"
    plugins.load_named(data.get("plugins"), f"{origin}: plugins")  # those a config file or override adds
    recipe = validate(data, origin)
    if recipe.train.warmup_steps > recipe.train.steps and (overrides or not saved):
        _fit_warmup(recipe.train, own_train, warmup_given=saved or _warmup_given(config_data, overrides))
    return recipe


def _warmup_given(config_data: dict, overrides) -> bool:
    """Whether a config file or an override sets ``train.warmup_steps`` (or the whole ``train``)."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    train = config_data.get("train")
    return bool(keys & {"train", "train.warmup_steps"}) or (isinstance(train, dict) and "warmup_steps" in train)


def _fit_warmup(train: TrainCfg, own: dict, warmup_given: bool) -> None:
    """A run shorter than its warm-up is trained, as timm's and Hugging Face's trainers do, with
    one line of warning. Where only its length was given (``--steps``) and the warm-up is the
    recipe's own (``own``: the recipe file's ``train``), the warm-up is scaled with the steps;
    else it is cut short: the run ends while the learning rate still rises."""
    steps, warmup = train.steps, train.warmup_steps
    base = own.get("steps", TrainCfg.model_fields["steps"].default)
    if not warmup_given and "warmup_steps" in own and isinstance(base, int) and base >= 1:
        train.warmup_steps = min(steps, max(1, round(warmup * steps / base)))
        _warn(f"train.steps {steps} is shorter than the recipe's warm-up (train.warmup_steps {warmup} of its "
              f"{base} steps): the warm-up is scaled with the steps, to {train.warmup_steps}; set "
              f"train.warmup_steps to choose another")
    else:
        _warn(f"train.warmup_steps {warmup} is more than train.steps {steps}: the warm-up is cut short, the run "
              f"ending at {steps / (warmup + 1):.0%} of train.lr")


def _warn(message: str) -> None:
    """A warning about the recipe, by rank 0 alone under torchrun (every rank reads the same recipe)."""
    if os.environ.get("RANK", "0") == "0":
        warnings.warn(message, stacklevel=3)


def registered_parts() -> dict[str, dict[str, str | None]]:
    """Every registered kind of each part (plugins' included): kind -> the module outside m3i that
    added it (None: m3i's own)."""
    from .backbones import backbone_names
    from .data.spec import SPEC_FORMS, module_of_spec

    own = lambda m: None if m is None or m == "m3i" or m.startswith("m3i.") else m  # noqa: E731
    out = {"backbone": {n: own(registered_by(n)) for n in backbone_names()}}
    out |= {f: {k: own(reg.module_of(k)) for k in reg.kinds()} for f, reg in PARTS.items()}
    out["data source"] = {form: own(module_of_spec(form.split("[")[0])) for form in SPEC_FORMS}
    return out


def describe_term(t: TermCfg, input_mode: str = "drop") -> dict[str, str]:
    """One row of the special-case table, in the paper's words, read off a term's config."""
    view = f"view {t.source.view + 1}"
    masked = {"drop": "masked ", "fill": "masked (mask-token) ", "mix": "masked, mixed "}[input_mode]
    source = TARGETS[t.target.kind].describe_input(t, masked) or ((masked + view) if t.source.masked else view)
    if t.decoder.kind == "global" and t.decoder.predictor:
        source += " (+ predictor)"
    if t.swap_views:
        source += ", both ways"
    return {"input": source, "target": TARGETS[t.target.kind].describe(t),
            "target_encoder": t.target_encoder.describe(), "estimator": ESTIMATORS[t.estimator.kind].describe(t.estimator)}


def check_accum_steps(k: int, batch_size: int, world_size: int, paired: bool) -> None:
    """Raise ValueError, naming the fields, when ``k`` micro-batches do not cut the batch of
    each of ``world_size`` ranks (``data.batch_size`` is the global batch) into equal ones."""
    per = batch_size // world_size
    ranks = f"the batch of each of the {world_size} ranks ({per} = data.batch_size {batch_size} / {world_size})" \
        if world_size > 1 else f"data.batch_size {batch_size}"
    if paired and (per // 2) % k:
        raise ValueError(f"train.accum_steps: {k} micro-batches do not divide half of {ranks}: the 'mix' input "
                         f"keeps the two images of each canvas (b and b + B/2) in one micro-batch, so "
                         f"{per // 2} must divide by {k}")
    if per % k:
        raise ValueError(f"train.accum_steps: {k} micro-batches do not divide {ranks}")


def plugins_used_by(recipe: Recipe) -> list[str]:
    """The plugins a run of ``recipe`` needs: those it names, every plugin imported so far (however
    it was named: it may change a part without registering one the recipe names), and the modules
    outside m3i that registered a part ``recipe`` uses (its backbone, data formats, and each term's
    target, target encoder, decoder and estimator)."""
    from .data.spec import module_of_spec

    mods = list(dict.fromkeys([*recipe.plugins, *plugins.loaded()]))
    found = [registered_by(recipe.backbone.name)] + [module_of_spec(s.spec) for s in recipe.data.sources]
    for t in recipe.terms:
        found += [reg.module_of(getattr(t, field).kind) for field, reg in PARTS.items()]
    for m in found:
        if m and not (m == "m3i" or m.startswith("m3i.")) and m not in mods:
            mods.append(m)
    return mods
