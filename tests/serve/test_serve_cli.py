"""Command line and environment configuration."""

from __future__ import annotations

import pytest

from phalanx_serve.cli import settings_from_args


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
