"""The core's log lines inside a vLLM process (hooks.route_core_logs).

Truth: Python's logging machinery itself. A record of a logger under ``llmco2_serve`` must reach the
handler that vLLM put on its ``vllm`` logger, also one installed after the route was added (vLLM
configures its logging after plugins load, and reconfiguring replaces the handler objects). The
real-server check, with vLLM's own format and process prefix, is in tests/test_e2e_vllm.py.
"""

from __future__ import annotations

import io
import logging

import pytest

from llmco2_serve.hooks import _ToVllmLogger, route_core_logs


@pytest.fixture
def clean_loggers():
    core, vllm_logger = logging.getLogger("llmco2_serve"), logging.getLogger("vllm")
    saved = (list(core.handlers), core.level, list(vllm_logger.handlers), vllm_logger.level, vllm_logger.propagate)
    core.handlers = [h for h in core.handlers if not isinstance(h, _ToVllmLogger)]
    core.setLevel(logging.NOTSET)
    vllm_logger.handlers = []
    yield core, vllm_logger
    core.handlers, vllm_logger.handlers = saved[0], saved[2]
    core.setLevel(saved[1])
    vllm_logger.setLevel(saved[3])
    vllm_logger.propagate = saved[4]


def _vllm_handler() -> tuple[logging.Handler, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("VLLMFMT %(levelname)s %(name)s %(message)s"))
    return handler, stream


def test_core_info_lines_go_through_the_handler_vllm_configures_later(clean_loggers, monkeypatch):
    core, vllm_logger = clean_loggers
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    assert route_core_logs() is True
    assert route_core_logs() is False  # idempotent: one route, no duplicated lines
    # vLLM configures its logging after the plugins load (dictConfig: a new handler object).
    first, first_out = _vllm_handler()
    vllm_logger.handlers = [first]
    vllm_logger.propagate = False
    logging.getLogger("llmco2_serve.runtime.service").info("llmco2: prediction table 1x1x1")
    logging.getLogger("llmco2_serve.runtime.service").debug("llmco2: not shown at INFO")
    assert first_out.getvalue() == "VLLMFMT INFO llmco2_serve.runtime.service llmco2: prediction table 1x1x1\n"
    # Reconfigured (e.g. --log-level on a later configure): the new handler gets the next line.
    second, second_out = _vllm_handler()
    vllm_logger.handlers = [second]
    logging.getLogger("llmco2_serve.hardware.gpu_energy").warning("llmco2 energy: no energy source")
    assert second_out.getvalue() == "VLLMFMT WARNING llmco2_serve.hardware.gpu_energy llmco2 energy: no energy source\n"
    assert first_out.getvalue().count("\n") == 1


def test_vllm_logging_level_is_honoured(clean_loggers, monkeypatch):
    core, vllm_logger = clean_loggers
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    route_core_logs()
    handler, out = _vllm_handler()
    vllm_logger.handlers = [handler]
    logging.getLogger("llmco2_serve.x").debug("llmco2: a debug line")
    assert "llmco2: a debug line" in out.getvalue()


def test_without_vllm_logging_the_root_configuration_gets_the_lines(clean_loggers, caplog):
    # VLLM_CONFIGURE_LOGGING=0: vLLM adds no handler; the operator's root configuration receives
    # the records (propagation is untouched) and the route emits nothing of its own.
    route_core_logs()
    with caplog.at_level(logging.INFO):
        logging.getLogger("llmco2_serve.runtime.service").info("llmco2: carbon intensity: static")
    assert [r.getMessage() for r in caplog.records] == ["llmco2: carbon intensity: static"]
