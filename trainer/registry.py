"""One registry per recipe factor: a `kind:` tag → (config type, builder).

A factor module declares its small config type next to the code it builds and registers
both in one line. The trainer's config schema is assembled from the registries, so a new
entry is selectable from a sweep file with no other edit, and an unknown `kind` is
rejected by validation with the valid names listed.

A registry may name `facts`: class attributes every config type in it must declare, which
cross-factor rules read instead of comparing kind strings (`TrainConfig`'s validators). A new
kind that does not state them is refused when it registers, so it cannot silently inherit
another kind's behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    """Base of every config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Registry:
    """Maps a `kind` name to its config type and the function that builds it."""

    def __init__(self, name: str, facts: tuple[str, ...] = (), nested: dict[str, Registry] | None = None):
        """`nested`: registries of fields inside this one's configs (REPA's `teacher`), by field name."""
        self.name, self.facts, self.nested = name, facts, dict(nested or {})
        self._entries: dict[str, tuple[type[Config], Callable[..., Any]]] = {}

    def register(self, config_type: type[Config]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        kind = config_type.model_fields["kind"].default
        if not isinstance(kind, str):
            raise TypeError(f"{config_type.__name__}.kind needs a string default (its registry name)")
        if kind in self._entries:
            raise ValueError(f"{self.name} registry already has an entry '{kind}'")
        undeclared = [fact for fact in self.facts if not hasattr(config_type, fact)]
        if undeclared:
            raise TypeError(
                f"{config_type.__name__} (the {self.name} kind '{kind}') must declare "
                f"{', '.join(undeclared)}: the rules that combine factors read them"
            )

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            self._entries[kind] = (config_type, builder)
            return builder

        return decorator

    @property
    def kinds(self) -> list[str]:
        return sorted(self._entries)

    def config_type(self, kind: str) -> type[Config]:
        return self._entries[kind][0]

    def union(self) -> Any:
        """The pydantic type accepting any registered config, chosen by its `kind` tag."""
        types = tuple(cfg for cfg, _ in self._entries.values())
        return Annotated[Union[types], Field(discriminator="kind")]  # noqa: UP007

    def build(self, cfg: Config, *args: Any, **kwargs: Any) -> Any:
        try:
            _, builder = self._entries[cfg.kind]  # type: ignore[attr-defined]
        except KeyError:
            raise ValueError(
                f"unknown {self.name} kind {cfg.kind!r}; valid: {', '.join(self.kinds)}"
            ) from None
        return builder(cfg, *args, **kwargs)
