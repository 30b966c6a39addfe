"""Router specs on the command line -> router config dataclasses, through the ``ROUTERS`` registry.

A spec is ``name`` or ``name:field=value:field.sub=value`` (values parsed as YAML), for example
``comet:gamma=0.5`` or ``dts:evolve.enabled=true``. ``name+`` is shorthand for
``name:local_search.enabled=true`` (the COMET+ permutation local search), and ``evomoe`` for
``dts:evolve.enabled=true`` (full EvoMoE: base expert, spawn, then DTS). ``all`` expands to every
registered router.

Every router's config is built from its own ``Config`` dataclass with, in order of priority:
the spec's explicit values; the tool's ``--k`` (set on ``k``, or on ``capacity_factor`` for routers
such as expert choice whose mean experts per token is their capacity factor); and the step-scaled
schedule fields (``scaled_schedule``) so the phase changes fall inside a short run. Fields a Config
does not have are left alone, except explicit spec values: those make the router be skipped with
a message naming the missing field (``SkipRouter``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from moe.routers import ROUTERS

ALIASES = {"evomoe": "dts:evolve.enabled=true"}
K_FIELDS = ("k", "capacity_factor")
BASE_FRACTION = 0.1
"""EvoMoE base-expert phase as a share of the run (the expert-diversify sweep, docs/compare_routers/README.md)."""
"""Config fields that take ``--k``; the first one a Config has is set."""


class SkipRouter(Exception):
    """This router cannot run in this comparison; the message says why."""


@dataclass(frozen=True)
class RouterSpec:
    label: str
    """As written on the command line; names the row in the table."""
    name: str
    """Registry name (``ROUTERS`` key)."""
    overrides: dict[str, Any]
    """Explicit dotted-path values from the spec."""


def parse_spec(text: str) -> RouterSpec:
    """Parse one ``name[:path=value]...`` spec (aliases and the ``+`` suffix expanded)."""
    label = text.strip()
    body = ALIASES.get(label, label)
    head, *pairs = body.split(":")
    overrides: dict[str, Any] = {}
    if head.endswith("+"):
        head = head[:-1]
        overrides["local_search.enabled"] = True
    for pair in pairs:
        path, sep, value = pair.partition("=")
        if not sep or not path:
            raise SkipRouter(f"router spec {label!r}: {pair!r} is not field=value")
        overrides[path.strip()] = yaml.safe_load(value)
    if head not in ROUTERS:
        raise SkipRouter(f"router spec {label!r}: {head!r} is not registered (known: {', '.join(sorted(ROUTERS))})")
    return RouterSpec(label=label, name=head, overrides=overrides)


def parse_router_list(text: str) -> list[str]:
    """Split ``--routers`` on commas; ``all`` expands to every registered router."""
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item == "all":
            out.extend(sorted(ROUTERS))
        elif item:
            out.append(item)
    return list(dict.fromkeys(out))


def scaled_schedule(steps: int) -> dict[str, int]:
    """Schedule fields scaled to a run of ``steps`` optimizer steps (set where a Config has them).

    DTS / activation DTS (EvoMoE, research/routers.md §2): temperature anneals over the first half,
    hard top-k from 3/4 of the run; with the expert-diversify phase on, the base-expert phase is the
    first ``BASE_FRACTION`` of the run and the DTS halves/quarters are those of the steps left after it
    (``resolve_values``);
    COMET+'s relaxed-permutation window the first 10% (the released configs use 1-10% of epochs).
    """
    return {
        "decay_steps": max(1, steps // 2),
        "hard_step": max(1, (3 * steps) // 4),
        "evolve.base_steps": max(1, int(steps * BASE_FRACTION)),
        "local_search.window_steps": max(1, steps // 10),
    }


def has_path(config_cls: type, path: str) -> bool:
    """Whether dataclass ``config_cls`` has the dotted field ``path`` (through nested dataclasses)."""
    cls: Any = config_cls
    for part in path.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        f = fields[part]
        cls = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return True


def with_values(config: Any, values: dict[str, Any]) -> Any:
    """Copy of ``config`` with dotted-path ``values`` set; nested configs rebuilt so each validates."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        top[head] = with_values(getattr(config, head), sub)
    return dataclasses.replace(config, **top)


def resolve_values(spec: RouterSpec, k: int | None, steps: int) -> dict[str, Any]:
    """The dotted-path values to set on ``spec``'s Config (priorities in the module docstring).

    Raises ``SkipRouter`` if an explicit spec value names a field the Config does not have.
    """
    cls = ROUTERS[spec.name].Config
    for path in spec.overrides:
        if not has_path(cls, path):
            names = [f.name for f in dataclasses.fields(cls)]
            raise SkipRouter(f"router {spec.label!r}: {cls.__name__} has no field {path!r} (fields: {', '.join(names)})")
    values = {path: v for path, v in scaled_schedule(steps).items() if has_path(cls, path)}
    if k is not None:
        field = next((f for f in K_FIELDS if has_path(cls, f)), None)
        if field is not None:
            values[field] = k
    values.update(spec.overrides)
    if values.get("evolve.enabled") and has_path(cls, "decay_steps"):
        # The DTS schedule counts from the spawn: fit it into the steps left after the base phase
        # (else a long base phase pushes the hard switch past the end of the run).
        left = max(1, steps - int(values["evolve.base_steps"]))
        for path, v in (("decay_steps", max(1, left // 2)), ("hard_step", max(1, (3 * left) // 4))):
            if path not in spec.overrides:
                values[path] = v
    return values


def build_config(spec: RouterSpec, k: int | None, steps: int) -> Any:
    """The router config for ``spec``; a ConfigError from validation becomes ``SkipRouter``."""
    values = resolve_values(spec, k, steps)
    try:
        return with_values(ROUTERS[spec.name].Config(), values)
    except (ValueError, TypeError) as err:  # ConfigError is a ValueError
        raise SkipRouter(f"router {spec.label!r}: invalid config: {err}") from err
