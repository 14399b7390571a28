"""The ``livemig`` command line: parse, build configs, call migrate/serve, display.

One module per command; they register themselves on the group in :mod:`livemig.cli.base`.
"""

from __future__ import annotations

from livemig.cli import bench, listen, migrate, resume  # noqa: F401 (each registers its command)
from livemig.cli.base import describe, main
from livemig.cli.params import parse_capability_spec, parse_size, split_capabilities

__all__ = ["describe", "main", "parse_capability_spec", "parse_size", "split_capabilities"]
