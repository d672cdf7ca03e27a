from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from phalanx.devcluster.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PHALANX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("command", ["build", "up", "down", "status", "env"])
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])

    assert result.exit_code == 0
    assert "Usage" in result.output


def test_up_without_binaries_is_one_line_naming_the_build_command(tmp_path: Path) -> None:
    result = runner.invoke(app, ["up", "--dir", str(tmp_path / "c")])

    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "run `phalanx dev build`" in result.output


def test_up_with_unknown_profile_names_the_choices(tmp_path: Path) -> None:
    result = runner.invoke(app, ["up", "--profile", "tpu", "--dir", str(tmp_path / "c")])

    assert result.exit_code == 1
    assert "choose one of ascend, cpu, gpu" in result.output


def test_down_is_safe_on_a_cluster_that_never_ran(tmp_path: Path) -> None:
    for _ in range(2):
        result = runner.invoke(app, ["down", "--dir", str(tmp_path / "c")])
        assert result.exit_code == 0
        assert "nothing was running" in result.output


def test_status_of_a_stopped_cluster_lists_components_and_fails(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--dir", str(tmp_path / "c")])

    assert result.exit_code == 1
    assert "kube-apiserver" in result.output
    assert "stopped" in result.output


def test_env_without_a_cluster_says_to_start_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["env", "--dir", str(tmp_path / "c")])

    assert result.exit_code == 1
    assert "run `phalanx dev up`" in result.output
