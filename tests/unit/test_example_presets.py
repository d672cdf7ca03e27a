"""Every example in jobs/ names the operator topology presets it runs under (a `# Topology
presets:` header line), and each of those presets has every level the example asks for; the
README's install line uses a preset its own example names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from phalanx.placement import PRESETS, GangRequest
from phalanx.placement.place import check_levels

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))
PRESETS_LINE = re.compile(r"^# Topology presets: (.+)$", re.M)


def named_presets(path: Path) -> list[str]:
    match = PRESETS_LINE.search(path.read_text())
    return [p.strip() for p in match.group(1).split(",")] if match else []


def topology_of(path: Path) -> dict[str, Any]:
    job = yaml.safe_load(path.read_text())
    return dict((job.get("spec") or {}).get("topology") or {})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_an_example_with_topology_names_its_presets(path: Path) -> None:
    topology = topology_of(path)
    presets = named_presets(path)
    if topology.get("required") or topology.get("preferred"):
        assert presets, f"{path.name} asks for topology levels: add '# Topology presets: ...'"
    assert set(presets) <= set(PRESETS), (
        f"{path.name}: unknown presets {set(presets) - set(PRESETS)}"
    )


CASES = [(path, preset) for path in EXAMPLES for preset in named_presets(path)]


@pytest.mark.parametrize(("path", "preset"), CASES, ids=[f"{p.stem}-{s}" for p, s in CASES])
def test_example_levels_exist_in_every_preset_it_names(path: Path, preset: str) -> None:
    job = yaml.safe_load(path.read_text())
    topology = topology_of(path)
    request = GangRequest(
        key=path.stem,
        pods=int(job["spec"]["nodes"]),
        required=topology.get("required"),
        preferred=topology.get("preferred"),
    )
    refusal = check_levels(request, PRESETS[preset])
    assert refusal is None, f"{path.name} under --topology {preset}: {refusal.message}"


def test_readme_install_preset_runs_the_readme_example() -> None:
    readme = (ROOT / "README.md").read_text()
    preset = re.search(r"--set operator\.topology=(\w+)", readme)
    assert preset is not None
    assert preset.group(1) in named_presets(ROOT / "jobs" / "gpt2-124m-h100.yaml")
