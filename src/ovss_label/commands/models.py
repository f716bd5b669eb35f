"""``ovss-label models list|pull|verify``: the weight table and the files on this machine;
``models versions|activate``: each project's trained versions, promotion and rollback."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from ovss_label.commands.options import data_dir_option, server_database, tiny_option
from ovss_label.methods import METHODS, SAM_MODELS


@click.group("models")
def models() -> None:
    """Model weights: what the backend uses, where the files are, whether they are intact."""


@models.command("list")
@click.option(
    "--manifest",
    is_flag=True,
    help="Print each method's identity as JSON instead: model_version, settings, the weight "
    "files (sha256) and artifacts it would load on this machine.",
)
@click.option(
    "--sam-model",
    type=click.Choice(SAM_MODELS),
    default="sam_vit_b",
    show_default=True,
    help="The SAM of the +sam methods and clip_sam (as serve/predict --sam-model).",
)
@tiny_option
def list_(manifest: bool, sam_model: str, tiny: bool) -> None:
    """The weight table and which file each weight would load: none ("no"), the published
    one, or another file (its predictions carry another model version); then each method's
    model_version on this machine.

    On a terminal tables, then each weight's licence and source; otherwise tab-separated
    weight rows with a header, for scripts. Names are never shortened: `models pull NAME`
    takes them.
    """
    from ovss_label.backend.models import WEIGHTS, weights_dir

    if manifest:
        click.echo(json.dumps([i.manifest() for i in _identities(sam_model, tiny)], indent=1))
        return

    header = ("name", "file", "MB", "licence", "present", "source")
    rows: list[tuple[str, ...]] = [
        (spec.name, spec.file, str(spec.size_mb), spec.licence, _presence(spec), spec.url)
        for spec in WEIGHTS.values()
    ]
    title = f"weights in {weights_dir()} (set OVSS_WEIGHTS_DIR)"
    console = Console()
    if not console.is_terminal:
        click.echo(title, err=True)  # stdout keeps only the rows
        for row in (header, *rows):
            click.echo("\t".join(row))
        return
    console.print(_table(rows, title))
    for name, _, _, licence, _, url in rows:  # long: wrapped by the terminal, never cut
        console.print(f"{name}: {licence}, {url}", soft_wrap=True, highlight=False)
    methods = Table(title="methods (model_version on this machine; --manifest for all of it)",
                    box=box.SIMPLE_HEAD)  # fmt: skip
    methods.add_column("method", no_wrap=True)
    methods.add_column("model_version", no_wrap=True)
    for identity in _identities(sam_model, tiny):
        methods.add_row(identity.method, identity.version)
    console.print(methods)


def _identities(sam_model: str, tiny: bool) -> list[Any]:
    """Every method's identity as ``serve`` runs it, with ``sam_model`` (nothing loads)."""
    from ovss_label.backend.proposers import method_plan

    return [
        method_plan(m, tiny=tiny, **({"sam_model": sam_model} if "sam" in m else {})).identity
        for m in METHODS
    ]


def _table(rows: list[tuple[str, ...]], title: str) -> Table:
    """Name, presence, size and file of each weight, fitted to the terminal: rich shrinks
    columns on a narrow one, so the name keeps its full width (it is what `models pull`
    takes) and the file name folds onto more lines instead of ending in "…"."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True, min_width=max(len(r[0]) for r in rows))
    table.add_column("present", no_wrap=True)
    table.add_column("MB", no_wrap=True, justify="right")
    table.add_column("file", overflow="fold")
    for name, file, size, _, present, _ in rows:
        table.add_row(name, f"[red]{present}[/]" if present.startswith("other") else present,
                      size, file)  # fmt: skip
    return table


def _presence(spec: Any) -> str:
    """``no``, ``published``, ``other <sha256 prefix>``, or ``yes`` for a hub snapshot (the
    table holds no digest for it). A weight with no published digest is ``pulled`` when the file
    is the one ``models pull`` recorded, ``unrecorded <prefix>`` when none was recorded. A file
    is hashed once per machine (cached)."""
    from ovss_label.backend.models.fingerprints import file_sha256
    from ovss_label.backend.models.weights import expected_sha256, find_weight

    found = find_weight(spec)
    if found is None:
        return "no"
    if found.is_dir():
        return "yes"
    digest, expected = file_sha256(found), expected_sha256(spec, found)
    if expected is None:
        return f"unrecorded {digest[:8]}"
    if digest == expected:
        return "published" if spec.sha256 else "pulled"
    return f"other {digest[:8]}"


@models.command("pull")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--force", is_flag=True, help="Download even if a file is present, replacing another file."
)
def pull(names: tuple[str, ...], force: bool) -> None:
    """Download weights into the weights directory, checking their sha256.

    A file already there that is not the published one is left alone unless --force.
    """
    from ovss_label.backend.models import get_spec
    from ovss_label.backend.models.download import DownloadError
    from ovss_label.backend.models.download import pull as fetch

    for name in names:
        try:
            spec = get_spec(name)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        with Progress(
            *Progress.get_default_columns(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
        ) as bar:
            job = bar.add_task(spec.file, total=spec.size_mb * 1_000_000 or None)
            try:
                path = fetch(
                    spec,
                    force=force,
                    progress=lambda done, total, job=job: bar.update(
                        job, completed=done, total=total
                    ),
                )
            except DownloadError as exc:
                raise click.ClickException(str(exc)) from exc
        click.echo(f"{spec.name}: {path}")
        if not spec.sha256 and spec.format != "hf_hub":
            click.echo(f"{spec.name}: no published sha256; recorded {_recorded(path)}")


def _recorded(path: Any) -> str:
    """The sha256 ``models pull`` recorded for ``path`` and where (its sidecar file)."""
    from ovss_label.backend.models.weights import recorded_sha256, sidecar_path

    return f"{recorded_sha256(path)} in {sidecar_path(path)}"


@models.command("verify")
@click.argument("names", nargs=-1)
def verify(names: tuple[str, ...]) -> None:
    """Check the sha256 of weight files (all table entries when no NAME is given).

    A weight with no published sha256 (DINOv2) is checked against the one recorded when
    `models pull` fetched it ("unverified" when none was recorded). Exits with status 1 if a
    present file does not match its sha256.
    """
    from ovss_label.backend.models import WEIGHTS, get_spec
    from ovss_label.backend.models.download import verify as check

    try:
        specs = [get_spec(n) for n in names] if names else list(WEIGHTS.values())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    table = Table(title="weight files")
    for column in ("name", "status", "path", "note"):
        table.add_column(column)
    results = [check(spec) for spec in specs]
    styles = {"ok": "green", "missing": "yellow", "unverified": "yellow", "mismatch": "red"}
    for result in results:
        style = styles[result.status]
        table.add_row(result.spec.name, f"[{style}]{result.status}[/]", str(result.path or "-"),
                      result.note)  # fmt: skip
    Console().print(table)
    if any(r.status == "mismatch" for r in results):
        raise SystemExit(1)


def _version_store(data_dir: Path) -> Any:
    """The data directory's versions store; a ClickException when it holds no server data."""
    from ovss_label.backend.learning.versions import VersionStore

    return VersionStore(server_database(data_dir), data_dir)


@models.command("versions")
@click.option("--project", type=int, required=True, help="The Label Studio project id.")
@data_dir_option
def versions(project: int, data_dir: Path) -> None:
    """List a project's trained versions, newest first: which is active (the one predictions
    use), which are pinned (pruning keeps them), their model_version and mIoU."""
    found = _version_store(data_dir).list(project)
    if not found:
        click.echo(f"project {project} has no trained versions: it uses its zero-shot method")
        return
    table = Table(title=f"versions of project {project}", box=box.SIMPLE_HEAD)
    for column in ("name", "active", "pinned", "created", "mIoU"):
        table.add_column(column, no_wrap=True)
    table.add_column("model_version", overflow="fold")
    for v in found:
        created = datetime.datetime.fromtimestamp(v.created_at).strftime("%Y-%m-%d %H:%M")
        miou = "" if v.miou is None else f"{v.miou:.3f}"
        table.add_row(v.name, "[green]active[/]" if v.active else "", "pinned" if v.pinned else "",
                      created, miou, escape(v.model_version))  # fmt: skip
    Console().print(table)
    if not any(v.active for v in found):
        click.echo("no active version: the project uses its zero-shot method")


@models.command("activate")
@click.option("--project", type=int, required=True, help="The Label Studio project id.")
@click.argument("version", required=False)
@click.option("--zero-shot", is_flag=True, help="Deactivate: back to the zero-shot method.")
@data_dir_option
def activate(project: int, version: str | None, zero_shot: bool, data_dir: Path) -> None:
    """Make VERSION (e.g. v2) the project's active version: promotion by hand, or rollback to
    an older one. With --zero-shot instead, the project goes back to its zero-shot method.

    The flip is one transaction in the data directory's database; the version's predictions
    carry its model_version.
    """
    from ovss_label.backend.learning.versions import VersionError

    if zero_shot == (version is not None):
        raise click.UsageError("give either VERSION or --zero-shot")
    store = _version_store(data_dir)
    if zero_shot:
        was = store.deactivate(project)
        click.echo(f"project {project}: zero-shot" + (f" (was {was.name})" if was else ""))
        return
    try:
        active = store.activate(project, version)
    except VersionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"project {project}: {active.name} active ({active.model_version})")
