"""Recipes: YAML files validated into one schema, with file and command-line overrides.

A recipe names the backbone, the views, the data mix, the training schedule and the list of
mutual-information terms. Every mistake is reported as ``FILE: field.path: what is expected``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

RECIPE_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A recipe, config file or override that cannot be used; the message says where and why."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class BackboneCfg(Strict):
    name: str = "vit_micro"
    img_size: int = 32
    # the token grid's stride in pixels; for ConvNeXt it picks the stem (final stride = 8·stem)
    patch_size: Optional[int] = 4
    in_chans: int = 3
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    dims: Optional[list[int]] = None
    depths: Optional[list[int]] = None
    stem_stride: Optional[int] = None
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False

    def kwargs(self) -> dict[str, Any]:
        skip = {"name", "grad_checkpointing"}
        kw = {k: v for k, v in self.model_dump().items() if v is not None and k not in skip}
        if self.name.startswith("convnext") and "patch_size" in kw:
            stride = kw.pop("patch_size")
            kw.setdefault("stem_stride", min(4, max(1, stride // 8)))
        return kw


class AugmentCfg(Strict):
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0


class MaskCfg(Strict):
    kind: Literal["block", "random"] = "block"
    ratio: float = Field(0.6, ge=0.0, lt=1.0)


class ViewsCfg(Strict):
    count: Literal[1, 2] = 2
    augment: list[AugmentCfg] = Field(default_factory=lambda: [AugmentCfg()])
    mask: MaskCfg = MaskCfg()
    input_mode: Literal["drop", "mix", "fill"] = "drop"

    @model_validator(mode="after")
    def _augment_per_view(self):
        if len(self.augment) not in (1, self.count):
            raise ValueError(f"augment: give one entry for all views or one per view ({self.count}), got {len(self.augment)}")
        return self

    def augment_for(self, view: int) -> AugmentCfg:
        return self.augment[view if len(self.augment) > 1 else 0]


class SourceCfg(Strict):
    spec: str
    weight: float = Field(1.0, gt=0)
    labels: bool = True
    captions: bool = True


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


class TrainCfg(Strict):
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(30, ge=0)
    clip_grad: float = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(200, ge=1)
    max_bad_steps: int = Field(10, ge=1)
    # torch.compile every block (ViT) or stage (ConvNeXt) of the backbones
    compile: bool = False
    # several processes (torchrun): ddp replicates the model, fsdp shards it (FSDP2, per block / stage)
    strategy: Literal["ddp", "fsdp"] = "ddp"


class EMACfg(Strict):
    momentum: float = Field(0.996, ge=0, le=1)
    end: float = Field(1.0, ge=0, le=1)


class SourceViewCfg(Strict):
    view: int = Field(0, ge=0, le=1)
    masked: bool = False


class TargetCfg(Strict):
    kind: Literal["label", "caption", "view", "pixels"]
    view: int = Field(0, ge=0, le=1)
    dense: bool = False
    # mixed input: the first image of each canvas predicts its own view, its partner ``view``
    paired: bool = False


class TargetEncoderCfg(Strict):
    kind: Literal["identity", "class_table", "text", "ema", "online", "frozen"]
    # identity (pixels)
    patch_norm: bool = True
    # class_table
    normalize: bool = True
    bias: bool = False
    # text
    tower: Literal["minilm", "scratch"] = "minilm"
    trainable: bool = False
    width: int = 256
    depth: int = 4
    # ema / online / frozen
    head: bool = False
    top_k: int = Field(0, ge=0)
    norm: Literal["none", "layer", "instance"] = "none"
    weights: Optional[str] = None
    backbone: Optional[BackboneCfg] = None


class DecoderCfg(Strict):
    kind: Literal["global", "dense"] = "global"
    # global: an MLP projector (dims, last = output) and an optional MLP predictor
    projector: list[PositiveInt] = Field(default_factory=lambda: [128])
    predictor: list[PositiveInt] = Field(default_factory=list)
    norm: Literal["batch", "layer", "none"] = "none"
    # dense: embed to width, projector blocks on the visible tokens, predictor blocks with queries
    width: int = 128
    projector_depth: int = Field(0, ge=0)
    depth: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    queries: Literal["masked", "target_view"] = "masked"


class EstimatorCfg(Strict):
    kind: Literal["boltzmann", "gaussian", "unigrad"]
    temperature: float = Field(0.1, gt=0)
    learn_temperature: bool = False
    candidates: Literal["classes", "batch", "all"] = "batch"
    directions: Literal[1, 2] = 1
    normalize: bool = True
    reduce: Literal["mean", "sum"] = "mean"
    lam: float = 0.02


class TermCfg(Strict):
    name: str
    weight: float = 1.0
    source: SourceViewCfg = SourceViewCfg()
    target: TargetCfg
    target_encoder: TargetEncoderCfg
    decoder: DecoderCfg = DecoderCfg()
    estimator: EstimatorCfg
    swap_views: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        enc, est, tgt = self.target_encoder.kind, self.estimator.kind, self.target.kind
        allowed = {
            "label": {"class_table"},
            "caption": {"text"},
            "pixels": {"identity"},
            "view": {"ema", "online", "frozen"},
        }[tgt]
        if enc not in allowed:
            raise ValueError(f"target_encoder.kind: a {tgt!r} target needs {' or '.join(sorted(allowed))}, got {enc!r}")
        dense = tgt == "pixels" or self.target.dense
        if dense and self.decoder.kind != "dense":
            raise ValueError("decoder.kind: a dense target (pixels or dense view features) needs the 'dense' decoder")
        if not dense and self.decoder.kind != "global":
            raise ValueError("decoder.kind: a global target needs the 'global' decoder")
        if est == "unigrad" and not dense:
            raise ValueError("estimator.kind: 'unigrad' is a dense estimator; use it with a dense target")
        if dense and est == "boltzmann":
            raise ValueError("estimator.kind: dense targets take 'gaussian' or 'unigrad'")
        if tgt == "label" and est == "boltzmann" and self.estimator.candidates != "classes":
            raise ValueError("estimator.candidates: a label target is scored against all 'classes'")
        if tgt in ("caption", "view") and not dense and est == "boltzmann" and self.estimator.candidates == "classes":
            raise ValueError("estimator.candidates: 'classes' needs a label target; use 'batch' or 'all'")
        if tgt in ("label", "caption") and est != "boltzmann":
            raise ValueError(f"estimator.kind: a {tgt!r} target is scored with 'boltzmann'")
        if self.decoder.kind == "dense" and self.decoder.queries == "target_view" and self.target.view == self.source.view:
            raise ValueError("decoder.queries: 'target_view' queries need a target view other than the source view")
        if self.decoder.kind == "dense" and self.decoder.queries == "masked" and self.target.view != self.source.view:
            raise ValueError("decoder.queries: 'masked' queries predict the source view itself; set target.view to source.view")
        if self.decoder.kind == "dense" and not self.source.masked:
            raise ValueError("source.masked: a dense prediction needs a masked source view")
        if self.target.paired and not (self.target.dense and self.decoder.queries == "target_view"):
            raise ValueError("target.paired: paired targets are dense features queried over a whole view "
                             "(decoder.queries: target_view)")
        if enc == "frozen" and not self.target_encoder.weights:
            raise ValueError("target_encoder.weights: a frozen target encoder needs a safetensors file")
        if self.decoder.kind == "dense" and self.decoder.width % self.decoder.heads:
            raise ValueError(f"decoder.width: {self.decoder.width} is not divisible by decoder.heads={self.decoder.heads}")
        if self.decoder.kind == "dense" and self.decoder.width % 8:
            raise ValueError(f"decoder.width: {self.decoder.width} must be a multiple of 8 (sin-cos position embedding)")
        return self


class Recipe(Strict):
    name: str
    description: str = ""
    backbone: BackboneCfg = BackboneCfg()
    views: ViewsCfg = ViewsCfg()
    data: DataCfg = DataCfg()
    train: TrainCfg = TrainCfg()
    ema: EMACfg = EMACfg()
    terms: list[TermCfg] = Field(min_length=1)

    @model_validator(mode="after")
    def _views_exist(self):
        for i, t in enumerate(self.terms):
            used = {t.source.view, t.target.view} if t.target.kind in ("view", "pixels") else {t.source.view}
            if t.swap_views:
                used.add(1)
            if max(used) >= self.views.count:
                raise ValueError(f"terms.{i}.target.view: term {t.name!r} uses view {max(used)} but views.count is {self.views.count}")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"terms: names must be unique, got {names}")
        for i, t in enumerate(self.terms):
            if t.target.paired and self.views.input_mode != "mix":
                raise ValueError(f"terms.{i}.target.paired: pairs exist only in the 'mix' input (views.input_mode)")
        if self.views.input_mode == "mix" and self.data.batch_size % 2:
            raise ValueError(f"data.batch_size: the 'mix' input pairs images, so it must be even, got {self.data.batch_size}")
        return self


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
        raise ConfigError(f"unknown recipe {name_or_path!r}; expected one of {', '.join(recipe_names())} or a .yaml file")
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


def validate(data: dict, origin: str, schema: type[BaseModel] = Recipe):
    """``data`` as a ``schema`` (a recipe by default), every mistake one ``origin: field: expectation`` line."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(_printable(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
                msg = f"{msg} (got {err['input']!r})"
            lines.append(f"{origin}: {loc}: {msg}")
        raise ConfigError("; ".join(lines)) from None


def load_recipe(name_or_path: str, config: str | None = None, overrides: list[str] = ()) -> Recipe:
    """Recipe file, then an optional config file merged over it, then key=value overrides."""
    path = recipe_path(name_or_path)
    data = _read_yaml(path)
    origin = str(path)
    if config:
        cpath = Path(config)
        if not cpath.is_file():
            raise ConfigError(f"{cpath}: config file not found")
        data = merge(data, _read_yaml(cpath))
        origin += f" + {cpath}"
    for item in overrides:
        data = apply_override(data, item)
    if overrides:
        origin += " + overrides"
    return validate(data, origin)


def describe_term(t: TermCfg, input_mode: str = "drop") -> dict[str, str]:
    """One row of the special-case table, in the paper's words, read off a term's config."""
    enc, est, tgt = t.target_encoder, t.estimator, t.target
    view = f"view {t.source.view + 1}"
    masked = {"drop": "masked ", "fill": "masked (mask-token) ", "mix": "masked, mixed "}[input_mode]
    source = (masked + view) if t.source.masked else view
    if t.decoder.kind == "global" and t.decoder.predictor:
        source += " (+ predictor)"
    if t.swap_views:
        source += ", both ways"
    target = {
        "label": "category",
        "caption": "paired caption",
        "pixels": "pixels of the masked patches" + (" (per-patch normalised)" if enc.patch_norm else ""),
        "view": ("dense features of " if tgt.dense else "") + ("the full same view" if tgt.view == t.source.view
                                                                else f"view {tgt.view + 1}")
        + (f" (its partner in the canvas: view {t.source.view + 1})" if tgt.paired else ""),
    }[tgt.kind]
    encoder = {
        "identity": "identity",
        "class_table": "learned class embeddings",
        "text": f"text tower ({enc.tower}, {'trained' if enc.trainable else 'frozen'})",
        "ema": "EMA encoder" + (" + projector" if enc.head else "") + (f", top-{enc.top_k} layers" if enc.top_k else ""),
        "online": "the same encoder",
        "frozen": "frozen model",
    }[enc.kind]
    if est.kind == "boltzmann":
        over = {"classes": "all classes", "batch": "the batch", "all": "the batch, both views (NT-Xent)"}[est.candidates]
        estimator = f"Boltzmann over {over}" + (", both directions" if est.directions == 2 else "")
    elif est.kind == "gaussian":
        estimator = "Gaussian" + (" on normalised features" if est.normalize else "")
    else:
        estimator = f"UniGrad (λ={est.lam})"
    return {"input": source, "target": target, "target_encoder": encoder, "estimator": estimator}
