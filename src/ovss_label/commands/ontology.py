"""``ovss-label ontology``: list the packaged ontologies; show one or its Label Studio config."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ovss_label.ontologies import (
    LABEL_CONFIG_KINDS,
    Vocabulary,
    label_config,
    list_ontologies,
    load,
    ontology_info,
)


@click.group()
def ontology() -> None:
    """Packaged ontologies: class names, NACLIP synonyms and prompt templates."""


@ontology.command("list")
def list_command() -> None:
    """List the ontologies that `ontology show` and the backend accept."""
    table = Table(title="Ontologies")
    table.add_column("name", no_wrap=True)
    table.add_column("classes", justify="right")
    table.add_column("background")
    table.add_column("aliases")
    table.add_column("source", overflow="fold")
    for info in list_ontologies():
        table.add_row(
            info.name,
            str(info.num_classes),
            "yes" if info.has_background else "no",
            ", ".join(info.aliases),
            info.source,
        )
    Console().print(table)


@ontology.command("show")
@click.argument("name")
@click.option(
    "--ls-config",
    "kind",
    type=click.Choice(LABEL_CONFIG_KINDS),
    help="Print only the Label Studio labeling config XML (brush, polygon, both or rectangle).",
)
def show_command(name: str, kind: str | None) -> None:
    """Show the classes of ontology NAME, or its Label Studio labeling config.

    Without --ls-config: a table of class index, name and synonyms (the text queries), plus the
    prompt-template set. With --ls-config: only the XML, so it can be redirected into a file.
    """
    try:
        vocab = load(name)
        info = ontology_info(name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if kind is not None:
        click.echo(label_config(vocab, kind), nl=False)
        return
    _print_classes(vocab, f"{info.name}: {info.title}")
    click.echo(f"templates: {info.templates} ({len(vocab.templates)} templates)")


def _print_classes(vocab: Vocabulary, title: str) -> None:
    table = Table(title=title)
    table.add_column("index", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("synonyms", overflow="fold")
    for index, (name, synonyms) in enumerate(zip(vocab.names, vocab.synonyms, strict=True)):
        table.add_row(str(index), name, ", ".join(synonyms))
    Console().print(table)
