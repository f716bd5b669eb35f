"""Project hygiene: torch-free converters, packaging, README/CI parity, lint and types."""

from __future__ import annotations

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
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


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
    proc = subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
