"""Call forms from before workloads, still accepted (with a DeprecationWarning)."""

from __future__ import annotations

import warnings
from typing import Any

from livemig.workload.base import Workload


def legacy_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Workload, tuple[Any, ...]]:
    """``migrate(address, region_bytes, GuestConfig, ...)`` (before workloads) as a model guest:
    the workload and the arguments after the GuestConfig."""
    from livemig.guest import GuestConfig
    from livemig.workload.model import ModelGuest

    warnings.warn("migrate(address, region_bytes, GuestConfig(...), ...) is deprecated: pass a workload,"
                  " e.g. migrate(address, ModelGuest(region_bytes, GuestConfig(...)), config)",
                  DeprecationWarning, stacklevel=3)
    size, guest, *rest = args
    if not isinstance(guest, GuestConfig):
        raise TypeError("the old call form is migrate(address, region_bytes, GuestConfig, config, ...)")
    image = kwargs.pop("image", None)
    return (ModelGuest.from_image(image) if image is not None else ModelGuest(size, guest)), tuple(rest)


__all__ = ["legacy_call"]
