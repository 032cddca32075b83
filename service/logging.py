"""structlog configuration: JSON lines with the request id bound per request."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure_logging(*, level: str = "info", json: bool = True) -> None:
    """Configure structlog once for the process; safe to call again (tests, CLI then serve)."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer)
        if json
        else structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def is_enabled_for(level: int) -> bool:
    """Whether structlog, as configured now, logs ``level``: for work done only to be logged.
    A module's lazy logger answers the same but binds a whole logger per call (~4 us)."""
    check = getattr(structlog.get_config()["wrapper_class"], "is_enabled_for", None)
    return True if check is None else bool(check(None, level))
