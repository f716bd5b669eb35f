"""The ``ovss-label`` command line: one click group; commands live in ``ovss_label.commands``."""

from __future__ import annotations

import click

from ovss_label import __version__
from ovss_label.commands.coco_import import coco_import
from ovss_label.commands.evaluate import evaluate
from ovss_label.commands.export import export
from ovss_label.commands.jobs_list import jobs
from ovss_label.commands.models import models
from ovss_label.commands.ontology import ontology
from ovss_label.commands.options import tiny_option
from ovss_label.commands.predict import predict
from ovss_label.commands.serve import serve
from ovss_label.commands.train import train
from ovss_label.commands.tune import tune


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ovss-label")
@tiny_option
def cli(tiny: bool) -> None:
    """Open-vocabulary segmentation pre-annotations for Label Studio."""
    # --tiny is read by each command from the context (commands/options.py), never exported.


cli.add_command(export)
cli.add_command(jobs)
cli.add_command(evaluate)
cli.add_command(coco_import)
cli.add_command(ontology)
cli.add_command(predict)
cli.add_command(models)
cli.add_command(serve)
cli.add_command(train)
cli.add_command(tune)


def main() -> None:
    """Console-script entry point."""
    cli()
