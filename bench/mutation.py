"""Mutation testing with mutmut 3.x, one package at a time, with that package's fast tests.

Run ``python bench/mutation.py converters`` (or ``backend/server``, ``backend/proposers``, or
several); ``--only converters/instance.py`` mutates one file of the package and ``--tests``
replaces its test selection. It prints: package, mutants, killed, survived, score %. Needs
``pip install mutmut`` (checked with 3.8.1), which is not a project dependency.

Why not ``mutmut run`` in the repository: mutmut names a mutant after its file's path
(``converters/instance.py`` -> ``converters.instance.x_f__mutmut_1``) and records which tests
reach it under the module name the tests imported. Here pyproject's ``package-dir`` maps the
folders ``backend/``, ``converters/``, ``ontologies/`` into the package ``ovss_label``, so the
tests import ``ovss_label.converters.instance``; the names never meet and mutmut stops with
"tests recorded trampoline hits but none match any mutant key" (or, where it did not check,
every mutant would be "no tests"). So this script stages the import layout under
``mutants/<package>/``: ``src/ovss_label`` with the three folders copied into it, ``tests/``,
and ``pyproject.toml`` whose ``[tool.mutmut]`` is the repository's plus ``source_paths`` (the
package, e.g. ``src/ovss_label/converters``), ``also_copy`` (the rest of ``src/ovss_label``),
the test selection and ``only_mutate``. mutmut then runs there: it strips ``src.`` from the
path, so mutant names are ``ovss_label.converters...``, and it puts ``mutants/src`` first on
``sys.path``, ahead of the editable install's finder (which ``sys.meta_path`` consults after
the path finder). Results stay in ``mutants/<package>/mutants/`` (git-ignored); a later run
reuses them for unchanged functions, and ``mutmut browse`` / ``mutmut show NAME`` work there.

mutmut 3.8 reads only ``[tool.mutmut]`` in ``pyproject.toml`` (or ``[mutmut]`` in setup.cfg);
its keys are ``source_paths`` (``paths_to_mutate`` is a deprecated alias) and
``pytest_add_cli_args_test_selection`` (``tests_dir`` likewise), with ``pytest_add_cli_args``,
``only_mutate``, ``also_copy``, ``process_isolation`` ... (``mutmut/configuration.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {"backend": "backend", "converters": "converters", "ontologies": "ontologies"}
"""Top-level folder -> its place in ``src/ovss_label`` (pyproject ``package-dir``)."""

FAST_TESTS = {
    "converters": [
        "tests/test_brush.py",
        "tests/test_coco.py",
        "tests/test_export.py",
        "tests/test_guarantees_converters.py",
        "tests/test_hostile_records.py",
        "tests/test_import.py",
        "tests/test_labelstudio.py",
        "tests/test_mutants_brush.py",
        "tests/test_mutants_coco.py",
        "tests/test_mutants_converters.py",
        "tests/test_mutants_labelstudio.py",
        "tests/test_mutants_ls.py",
        "tests/test_mutants_ls_tasks.py",
        "tests/test_mutants_overlay.py",
        "tests/test_mutants_polygons.py",
        "tests/test_polygons.py",
        "tests/test_predict_cli.py",  # overlays
        "tests/test_project_config.py",  # ls_project
        "tests/test_proposers.py",  # min_area_pixels, instances -> polygon regions
        "tests/test_yolo_labelme.py",
    ],
    "backend/server": [
        "tests/test_cli_options.py",  # serve's options
        "tests/test_confidence.py",  # Engine.calibration
        "tests/test_identity.py",
        "tests/test_learning_jobs_api.py",  # /jobs and the report files
        "tests/test_learning_loop.py",  # learning_loop(settings)
        "tests/test_learning_serving.py",  # Chooser: versions, missing heads
        "tests/test_logs.py",
        "tests/test_media.py",
        "tests/test_media_fetch.py",
        "tests/test_project_config.py",
        "tests/test_server.py",
        "tests/test_server_hardening.py",
        "tests/test_server_requests.py",
        "tests/test_server_settings.py",
        "tests/test_text_prompt.py",
    ],
    "backend/proposers": [
        "tests/test_clip_sam.py",
        "tests/test_confidence.py",  # confidence.py (calibration)
        "tests/test_guarantees_converters.py",
        "tests/test_guarantees_methods.py",
        "tests/test_identity.py",
        "tests/test_naclip.py",
        "tests/test_pamr.py",
        "tests/test_pnp.py",
        "tests/test_pnp_proposer.py",
        "tests/test_proposer_contracts.py",
        "tests/test_proposer_plans.py",
        "tests/test_proposers.py",
        "tests/test_reference_defaults.py",
        "tests/test_sam.py",
        "tests/test_text_prompt.py",
    ],
}
"""Per package, the test files that exercise it without weights, GPU or Label Studio."""


def staged_path(folder: str) -> str:
    """``converters/instance.py`` -> ``src/ovss_label/converters/instance.py``."""
    top, _, rest = folder.partition("/")
    return "/".join(p for p in ("src/ovss_label", LAYOUT[top], rest) if p)


def stage(package: str, stage_dir: Path) -> None:
    """Copies the import layout into ``stage_dir`` (sources refreshed, mutmut's data kept)."""
    src = stage_dir / "src" / "ovss_label"
    for old in (src.parent, stage_dir / "tests"):
        shutil.rmtree(old, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src" / "ovss_label", src, ignore=ignore)
    for folder, target in LAYOUT.items():
        shutil.copytree(ROOT / folder, src / target, ignore=ignore)
    shutil.copytree(ROOT / "tests", stage_dir / "tests", ignore=ignore)


def also_copy(target: str, stage_dir: Path) -> list[str]:
    """Everything in ``src/`` except ``target``'s folder: the siblings along its path."""
    out, here = [], stage_dir / "src"
    for part in Path(target).parts[1:]:  # below "src"
        out += [str(p.relative_to(stage_dir)) for p in sorted(here.iterdir()) if p.name != part]
        here = here / part
    return [p for p in out if not p.endswith("__pycache__")]


OWNED_KEYS = ("source_paths", "also_copy", "pytest_add_cli_args_test_selection", "only_mutate")
"""``[tool.mutmut]`` keys this script sets per package (the repository's table must not)."""


def mutmut_config(package: str, stage_dir: Path, only: list[str], tests: list[str]) -> str:
    """The staged ``pyproject.toml``: the repository's, its ``[tool.mutmut]`` moved to the end
    and completed with ``OWNED_KEYS``."""
    text = (ROOT / "pyproject.toml").read_text()
    head, _, tail = text.partition("\n[tool.mutmut]\n")
    table, _, rest = tail.partition("\n[")
    rest = "\n[" + rest if rest else ""
    if any(line.split("=")[0].strip() in OWNED_KEYS for line in table.splitlines()):
        raise SystemExit(f"pyproject.toml [tool.mutmut] must not set {OWNED_KEYS}")
    target = staged_path(package)
    owned = {
        "source_paths": [target],
        "also_copy": also_copy(target, stage_dir),
        "pytest_add_cli_args_test_selection": tests,
        "only_mutate": [staged_path(f) for f in only],
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in owned.items()]  # JSON is TOML here
    return f"{head}{rest}\n\n[tool.mutmut]\n{table.strip()}\n" + "\n".join(lines) + "\n"


def with_exit_code(stage_dir: Path, wanted: int | None) -> list[str]:
    """Names of the mutants in ``stage_dir`` whose recorded exit code is ``wanted``: 0 for
    survivors, None for mutants not run yet."""
    names = []
    for meta in sorted(stage_dir.glob("mutants/**/*.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        names += [name for name, code in codes.items() if code == wanted]
    return names


def run(
    package: str, only: list[str], tests: list[str] | None, children: int, again: bool = False
) -> dict[str, int]:
    """Runs mutmut on one package in its staging folder; returns mutmut's CI/CD counts.

    ``again``: only the survivors of the last run, with the present tests, then whatever is
    not run yet (mutants of functions changed since, whose verdicts mutmut dropped). mutmut
    keeps a survivor's verdict while the test selection is unchanged, so tests written
    against survivors are counted only when the survivors are run again by name.
    """
    stage_dir = ROOT / "mutants" / package.replace("/", "-")
    stage_dir.mkdir(parents=True, exist_ok=True)
    names = with_exit_code(stage_dir, 0) if again else []
    stage(package, stage_dir)
    selection = tests or FAST_TESTS[package]
    (stage_dir / "pyproject.toml").write_text(mutmut_config(package, stage_dir, only, selection))
    mutmut = [sys.executable, "-m", "mutmut"]
    command = [*mutmut, "run", "--max-children", str(children)]
    if names:
        _mutmut_run([*command, *names], stage_dir)
    if not names or with_exit_code(stage_dir, None):  # a plain run takes only what is not run
        _mutmut_run(command, stage_dir)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=stage_dir, check=True)
    counts: dict[str, int] = json.loads((stage_dir / "mutants/mutmut-cicd-stats.json").read_text())
    return counts


def _mutmut_run(command: list[str], stage_dir: Path) -> None:
    done = subprocess.run(command, cwd=stage_dir)
    if done.returncode != 0:  # e.g. the clean tests failed: no counts to report
        raise SystemExit(f"mutmut run failed in {stage_dir} (exit {done.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", choices=sorted(FAST_TESTS))
    parser.add_argument("--only", nargs="*", default=[], help="e.g. converters/instance.py")
    parser.add_argument("--tests", nargs="*", help="test files instead of the package's fast tests")
    parser.add_argument("--max-children", type=int, default=2, help="parallel workers")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="re-run the last run's survivors (and what is not run yet) with the present tests",
    )
    args = parser.parse_args()
    stray = [f for f in args.only if not any(f.startswith(p + "/") for p in args.packages)]
    if stray:
        parser.error(f"--only files outside the packages given: {stray}")
    table = Table("package", "mutants", "killed", "survived", "score %", title="mutmut")
    notes = []
    for package in args.packages:
        only = [f for f in args.only if f.startswith(package + "/")]
        if args.only and not only:
            continue  # --only names files of the other packages
        counts = run(package, only, args.tests, args.max_children, args.survivors)
        # mutmut's own badge score: timeouts count as killed, skipped mutants do not count.
        killed = counts["killed"] + counts["timeout"]
        tested = counts["total"] - counts["skipped"]
        score = f"{100 * killed / tested:.1f}" if tested else "-"
        table.add_row(package, str(counts["total"]), str(killed), str(counts["survived"]), score)
        # A crash of the test process (e.g. cv2 given None) is "segfault", not "killed".
        other = {k: counts[k] for k in ("no_tests", "suspicious", "segfault") if counts.get(k)}
        if other:
            notes.append(f"{package}: not counted as killed: {other} (see `mutmut results`)")
    Console().print(table)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
