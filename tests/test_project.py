"""Project hygiene: torch-free converters, packaging, README/CI parity, lint and types."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import LABEL_CONFIG, LS_EXPORT

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {
    "src/ovss_label": "ovss_label",
    "backend": "ovss_label.backend",
    "converters": "ovss_label.converters",
    "ontologies": "ovss_label.ontologies",
}

BLOCK_TORCH = """
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
"""


def test_converters_and_export_work_without_torch(tmp_path: Path) -> None:
    out = tmp_path / "coco.json"
    code = (
        BLOCK_TORCH
        + f"""
import ovss_label.converters, ovss_label.ontologies
from ovss_label.cli import cli
try:
    cli(["export", "--coco", {str(LS_EXPORT)!r}, "-o", {str(out)!r},
         "--label-config", {str(LABEL_CONFIG)!r}], standalone_mode=False)
    tasks = {str(tmp_path / "t.json")!r}
    cli(["import", "--coco", {str(out)!r}, "-o", tasks], standalone_mode=False)
finally:
    assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "torch was imported"
try:
    import torch
except ImportError:
    print("BLOCKED")
"""
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("BLOCKED") and out.exists()


def test_every_package_directory_is_packaged() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {ROOT / d: p for p, d in config["package-dir"].items()} == {
        ROOT / d: p for d, p in MAPPED.items()
    }
    expected = set()
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((package, *rel)))
    expected.add("ovss_label.ontologies.data")  # package data (YAML), no __init__
    assert set(config["packages"]) == expected
    assert list((ROOT / "ontologies" / "data").glob("*.yaml"))


def _readme_commands() -> list[str]:
    """The Set up section's top-level ``bash`` blocks, which every reader runs; a block indented
    in a list item is one alternative (the CPU build of torch, from download.pytorch.org, which
    the CI machine cannot reach)."""
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", setup, flags=re.S | re.M)]


def test_ci_runs_exactly_the_readme_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == commands


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy", "--strict", "converters", "ontologies", "backend"],
        ["mypy", "src"],
    ],
    ids=" ".join,
)
def test_lint_and_types(command: list[str]) -> None:
    tool = Path(sys.executable).parent / command[0]
    proc = subprocess.run(
        [str(tool), *command[1:], *_mypy_cache(command)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _mypy_cache(command: list[str]) -> list[str]:
    """A cache folder of its own for each mypy command (in the git-ignored ``.mypy_cache/``):
    the strict and the plain run share torch's modules with different options, so in one folder
    each run invalidates the other's entries and every run is cold (70-110 s instead of
    seconds)."""
    if command[0] != "mypy":
        return []
    return ["--cache-dir", str(Path(".mypy_cache") / "-".join(a.strip("-") for a in command[1:]))]


def test_readme_weights_table_names_every_weight() -> None:
    from ovss_label.backend.models import WEIGHTS

    section = (ROOT / "README.md").read_text().split("\n## Weights\n", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)
    assert sorted(names) == sorted(WEIGHTS)


def test_private_env_moves_every_per_user_location(tmp_path: Path) -> None:
    """The e2e subprocesses and this process get their home, XDG folders, model hub caches and
    ovss-label's cache and weights under a temporary folder, whatever the user's shell set."""
    from conftest import PRIVATE_DIRS, private_env

    user = {name: f"/home/user/{name}" for name in PRIVATE_DIRS}
    user |= {"HF_HUB_CACHE": "/home/user/hub", "TRANSFORMERS_CACHE": "/home/user/tf"}
    env = private_env({**user, "PATH": "/usr/bin", "LANG": "C.UTF-8"}, tmp_path)
    per_user = {k: v for k, v in env.items() if k in PRIVATE_DIRS or "CACHE" in k}
    assert set(per_user) >= set(PRIVATE_DIRS)
    assert all(Path(v).is_relative_to(tmp_path) for v in per_user.values()), per_user
    assert env["PATH"] == "/usr/bin" and env["LANG"] == "C.UTF-8"


def test_this_process_uses_the_private_home() -> None:
    """Set before the hub clients were imported (they read their folders once, at import)."""
    import torch.hub
    from conftest import REAL_HOME
    from huggingface_hub import constants

    home = Path.home()
    assert home != REAL_HOME and Path(os.environ["OVSS_CACHE_DIR"]).is_relative_to(home)
    assert Path(constants.HF_HUB_CACHE).is_relative_to(home)
    assert Path(torch.hub.get_dir()).is_relative_to(home)


def test_docker_compose_wires_label_studio_to_the_backend() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    ls, backend = compose["services"]["label-studio"], compose["services"]["ovss-label"]
    assert ls["image"].startswith("heartexlabs/label-studio:1.23")
    assert ls["environment"]["ML_BLOCK_LOCAL_IP"] == "false"
    assert ls["environment"]["SSRF_PROTECTION_ENABLED"] == "false"
    assert backend["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert backend["command"][0] == "serve" and "healthcheck" in ls
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert (
        "/health" in dockerfile and 'CMD ["serve"' in dockerfile and "ARG TORCH_INDEX" in dockerfile
    )
