"""The base of every settings class: unknown keys are errors, so a field of another kind of
part (a temperature on a Gaussian estimator) is reported instead of silently ignored."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag

from .registry import kind_of


class ConfigError(ValueError):
    """A recipe, config file or override that cannot be used; the message says where and why."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def union_of(configs: tuple[type[Strict], ...], default: str | None = None):
    """A field type accepting any of ``configs``, picked by their ``kind`` (a discriminated union);
    ``default``: the kind of a mapping that names none."""

    def pick(value):
        if isinstance(value, dict):
            return value.get("kind", default)
        return getattr(value, "kind", None)

    members = tuple(Annotated[c, Tag(kind_of(c))] for c in configs)
    return Annotated[Union[members], Discriminator(pick)]  # noqa: UP007  (a union of a runtime tuple)
