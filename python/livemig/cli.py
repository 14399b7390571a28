"""The ``livemig`` command line."""

from __future__ import annotations

import click

import livemig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(livemig.__version__, prog_name="livemig")
def main() -> None:
    """Live-migrate memory regions between processes and hosts.

    Precopy with kernel dirty tracking, postcopy on userfaultfd, and virtio-balloon free page hints
    that stay correct under postcopy.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
