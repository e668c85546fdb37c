"""The architectures, by name: each architecture module registers its stacked SAE class here.

`@register` on a StackedSAE subclass makes its `arch` a value of `sae.arch` (checked against
this registry, listed by train.py --help), builds it in make_sae and the trainer, and runs its
exported forward (`exported_acts`) for every checkpoint whose SAELens architecture is its own.
docs/adding-an-architecture.md walks through adding one.
"""

from __future__ import annotations

from collections.abc import Callable

from saesweep.configtools import closest
from saesweep.errors import UserError
from saesweep.sae.base import StackedSAE

ARCHITECTURES: dict[str, type[StackedSAE]] = {}
"""arch name -> its stacked SAE class."""


def register(cls: type[StackedSAE]) -> type[StackedSAE]:
    """Class decorator: add `cls` under its `arch`. Architectures that export as one SAELens
    architecture must share its exported forward (they are read back by it)."""
    if cls.arch in ARCHITECTURES:
        raise ValueError(f"architecture {cls.arch!r} is registered twice")
    same = [
        c for c in ARCHITECTURES.values() if c.sae_lens_architecture == cls.sae_lens_architecture
    ]
    if same and same[0].exported_acts != cls.exported_acts:
        raise ValueError(
            f"{cls.__name__} exports as SAELens {cls.sae_lens_architecture!r} with another "
            f"exported forward than {same[0].__name__}"
        )
    ARCHITECTURES[cls.arch] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered architecture names, sorted."""
    return tuple(sorted(ARCHITECTURES))


def single_hook_names() -> tuple[str, ...]:
    """The registered architectures that read one hook (all but the layered ones, e.g. clt),
    sorted."""
    return tuple(name for name in names() if not ARCHITECTURES[name].layered)


def architecture(name: str) -> type[StackedSAE]:
    """The class registered as `name`; an unknown name is a UserError with the closest one."""
    if name not in ARCHITECTURES:
        raise UserError(
            f"sae.arch {name!r} is not an architecture{closest(name, ARCHITECTURES)}; "
            f"registered: {', '.join(names())}"
        )
    return ARCHITECTURES[name]


def exported_forward(sae_lens_architecture: str) -> Callable:
    """The exported forward (StackedSAE.exported_acts) of the architectures that export as
    `sae_lens_architecture` (SAELens's name of an SAE, e.g. 'jumprelu' or 'standard')."""
    for cls in ARCHITECTURES.values():
        if cls.sae_lens_architecture == sae_lens_architecture:
            return cls.exported_acts
    raise UserError(
        f"cfg.json architecture {sae_lens_architecture!r} is none of saesweep's "
        f"({', '.join(sorted({c.sae_lens_architecture for c in ARCHITECTURES.values()}))})"
    )


def section_readers(section: str) -> tuple[str, ...]:
    """The architectures that read SAEConfig's section `section` (the options of the
    architecture of that name): it, the architectures built on its class, and those that
    name it in reads_sections."""
    owner = ARCHITECTURES.get(section)
    if owner is None:
        return ()
    return tuple(
        name
        for name, cls in ARCHITECTURES.items()
        if issubclass(cls, owner) or section in cls.reads_sections
    )
