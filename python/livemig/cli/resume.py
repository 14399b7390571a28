"""``livemig resume PATH``: resumes a paused postcopy migration through its control socket."""

from __future__ import annotations

import sys

import click

from livemig import migration, wire
from livemig.cli.base import main
from livemig.cli.params import ADDRESS
from livemig.errors import MigrationError


@main.command()
@click.argument("control_path", metavar="PATH", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=ADDRESS, metavar="HOST:PORT", default=None,
              help="Resume towards this destination address (default: the one it used).")
def resume(control_path: str, to: wire.Address | None) -> int:
    """Resume a paused postcopy migration (`livemig migrate --control PATH`)."""
    try:
        answer = migration.request_resume(control_path, None if to is None else str(to))
    except OSError as e:
        raise MigrationError(f"no migration at {control_path}: {e.strerror or e}") from None
    sys.stdout.write(answer + "\n")
    sys.stdout.flush()
    return 0


