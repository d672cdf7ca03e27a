"""Command line and environment configuration."""

from __future__ import annotations

import pytest

from phalanx_serve.cli import settings_from_args
from phalanx_serve.model_runner import check_shardable
from phalanx_serve.settings import GroupSettings


def test_flags_override_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_SERVE_MODEL", "/models/a")
    monkeypatch.setenv("PHALANX_SERVE_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("PHALANX_SERVE_API_KEY", "k")
    settings = settings_from_args(["--max-batch-size", "8", "--served-model-name", "a"])
    assert settings.model == "/models/a"
    assert settings.max_batch_size == 8
    assert settings.api_key == "k"
    assert settings.model_name == "a"
    assert settings.port == 8000


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-model"),
        pytest.param(["--model", "m", "--max-batch-size", "0"], id="zero-batch"),
        pytest.param(["--model", "m", "--max-model-len", "1"], id="tiny-context"),
        pytest.param(["--model", "m", "--port", "http"], id="non-numeric-port"),
        pytest.param(["--model", "m", "--env-port"], id="unknown-flag"),
    ],
)
def test_invalid_command_lines_exit_with_usage(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PHALANX_SERVE_MODEL", raising=False)
    with pytest.raises(SystemExit) as exc:
        settings_from_args(argv)
    assert exc.value.code == 2


def test_a_malformed_environment_value_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_SERVE_MAX_QUEUE", "many")
    with pytest.raises(SystemExit) as exc:
        settings_from_args(["--model", "m"])
    assert exc.value.code == 2


def test_the_operators_group_environment_makes_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_LEADER_ADDRESS", "svc-0-0.svc-peers.ns.svc")
    monkeypatch.setenv("PHALANX_GROUP_SIZE", "2")
    monkeypatch.setenv("PHALANX_WORKER_INDEX", "1")
    settings = settings_from_args(["--model", "m"])
    assert settings.group == GroupSettings("svc-0-0.svc-peers.ns.svc", 2, 1, 29500)
    assert not settings.group.is_leader


def test_a_group_of_one_serves_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_GROUP_SIZE", "1")
    monkeypatch.setenv("PHALANX_WORKER_INDEX", "0")
    assert settings_from_args(["--model", "m"]).group is None


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--group-size", "2"], id="no-leader-address"),
        pytest.param(
            ["--group-size", "2", "--leader-address", "h", "--worker-index", "2"], id="index"
        ),
        pytest.param(["--enable-prefix-caching", "maybe"], id="prefix-caching-flag"),
    ],
)
def test_bad_group_or_cache_flags_exit_with_usage(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PHALANX_LEADER_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exc:
        settings_from_args(["--model", "m", *argv])
    assert exc.value.code == 2


def test_models_that_do_not_split_evenly_are_refused() -> None:
    with pytest.raises(ValueError, match="4 attention heads do not split evenly over a group of 3"):
        check_shardable(4, 2, 384, 3)
