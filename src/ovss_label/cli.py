"""The ``ovss-label`` command line: one click group; commands live in ``ovss_label.commands``."""

from __future__ import annotations

import click

from ovss_label import __version__
from ovss_label.commands.coco_import import coco_import
from ovss_label.commands.export import export
from ovss_label.commands.ontology import ontology


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ovss-label")
def cli() -> None:
    """Open-vocabulary segmentation pre-annotations for Label Studio."""


cli.add_command(export)
cli.add_command(coco_import)
cli.add_command(ontology)


def main() -> None:
    """Console-script entry point."""
    cli()
