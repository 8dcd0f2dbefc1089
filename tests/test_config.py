"""Config: defaults, environment variables, aliases, overrides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ucxrpc import Config, Manager


def test_defaults() -> None:
    cfg = Config()
    assert cfg.progress_mode == "blocking"
    assert cfg.max_inflight > 0 and cfg.max_message_size > 0


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCXRPC_PROGRESS_MODE", "latency")
    monkeypatch.setenv("UCXRPC_MAX_INFLIGHT", "7")
    monkeypatch.setenv("UCXRPC_UCX_OPTIONS", '{"UCX_TLS": "tcp"}')
    cfg = Config()
    assert cfg.progress_mode == "polling"
    assert cfg.max_inflight == 7
    assert cfg.ucx_options == {"TLS": "tcp"}


def test_overrides_and_validation() -> None:
    m = Manager(Config(max_inflight=3), progress_mode="efficient")
    assert (m.config.max_inflight, m.config.progress_mode) == (3, "efficient")
    with pytest.raises(ValidationError):
        Config(progress_mode="turbo")
    with pytest.raises(ValidationError):
        Config(bogus=1)  # type: ignore[call-arg]


def test_the_scheduler_slice_setting_is_validated() -> None:
    assert Config().sched_slice_us == 100.0
    assert Config(sched_slice_us=0).sched_slice_us == 0
    with pytest.raises(ValueError):
        Config(sched_slice_us=-1)
    with pytest.raises(ValueError):
        Config(sched_slice_us=200_000)
