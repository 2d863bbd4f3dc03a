"""Structured logs: one JSON object per line on stderr, for the app's own loggers and uvicorn's alike.

structlog renders every record, from `logging.getLogger(__name__)` calls (the app and libraries) and from
structlog loggers, with the request's context variables merged in (request_id, and cache/strategy once a route
knows them). uvicorn's own access log is switched off: `app.core.middleware.RequestMiddleware` writes one access
line per request with more in it. Configured when the app is created, i.e. after uvicorn set up its logging,
so these handlers are the ones in force under `uvicorn app.main:app` as well as under `python -m app`.
"""

from __future__ import annotations

import logging
import sys

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # into the root handler, once
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate, access.disabled = False, True


bind = structlog.contextvars.bind_contextvars  # routes/services add fields to the request's access line
access_logger = structlog.get_logger("sglora.access")
