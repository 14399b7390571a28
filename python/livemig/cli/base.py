"""The ``livemig`` command group and what every command shares: mistakes end as one line on
stderr (``livemig: error: ...``), exit code 2 for usage errors (found before anything starts), 1
for failures; ``--json`` prints exactly one JSON object on stdout, also when a command fails."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from typing import Any

import click
from rich.console import Console

import livemig
from livemig import display, migration, wire
from livemig.errors import LivemigError


class _Group(click.Group):
    """A group whose errors are one ``livemig: error:`` line, never a usage block or traceback;
    without a command it prints its help (on stderr, exit code 2: nothing was asked)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:
            click.echo(ctx.get_help(), err=True)
            ctx.exit(2)
        return super().parse_args(ctx, args)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            error(e.format_message())
            sys.exit(2)
        except click.ClickException as e:
            error(e.format_message())
            sys.exit(e.exit_code)
        except click.Abort:
            error("interrupted")
            sys.exit(130)
        except LivemigError as e:
            error(describe(e))
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def error(message: str) -> None:
    line = " ".join(message.split())  # one line, whatever the message
    sys.stderr.write(f"livemig: error: {line}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    """One ``livemig: warning: ...`` line on stderr."""
    sys.stderr.write(f"livemig: warning: {' '.join(message.split())}\n")
    sys.stderr.flush()


def describe(e: BaseException) -> str:
    """An exception as one line, with its cause when the message does not already say it."""
    msg = str(e) or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in msg:
        msg = f"{msg}: {cause}"
    return msg


def usage(message: str, param: str | None = None) -> click.UsageError:
    if param:
        return click.BadParameter(message, param_hint=f"'{param}'")
    return click.UsageError(message)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(livemig.__version__, prog_name="livemig")
def main() -> None:
    """Live-migrate memory regions between processes and hosts.

    Precopy with kernel dirty tracking, postcopy on userfaultfd, and virtio-balloon free page hints
    that stay correct under postcopy.
    """


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(display.json_ready(obj), allow_nan=False) + "\n")
    sys.stdout.flush()


def events_output(stack: ExitStack, path: str | None) -> migration.EventWriter | None:
    """The ``--events FILE|-`` writer (None without the option); the file closes with ``stack``."""
    if path is None:
        return None
    if path == "-":
        return migration.EventWriter(sys.stdout)
    try:
        f = stack.enter_context(open(path, "w", encoding="utf-8"))  # noqa: SIM115 (closed by the stack)
    except OSError as e:
        raise usage(f"cannot write the events to {path}: {e.strerror or e}", "--events") from None
    return migration.EventWriter(f)


def load_secret(path: str | None) -> bytes | None:
    try:
        return wire.load_secret(path)
    except (OSError, ValueError) as e:
        what = getattr(e, "strerror", None) or str(e)
        raise usage(f"cannot use the secret: {what}", "--secret-file") from None



__all__ = ["describe", "error", "events_output", "load_secret", "main", "print_json", "stderr_console", "usage",
           "warn"]
