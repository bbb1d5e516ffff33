"""structlog set-up shared by every process: JSON off a TTY, readable on one, stdlib logs included.

pynetdicom and celery log through the standard library; ``ProcessorFormatter`` renders their
records with the same processors, so an operator greps one schema.  Patient identifiers never
appear in logs: a processor redacts the patient attributes whoever logs them, another the values pydicom
and highdicom quote in their warnings, and the code logs job ids (a hash of the Study Instance UID), never
a UID or a patient attribute.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog
import structlog.tracebacks

# Attribute names whose values must never reach a log line, whoever logs them.
_PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
        "OtherPatientNames",
    }
)


def _drop_phi(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in _PHI_KEYS.intersection(event_dict):
        event_dict[key] = "<redacted>"
    return event_dict


#: Loggers of libraries that quote a data set's values in their messages: pydicom's validation
#: ("Invalid value for VR DA: '1958-11-23'."), highdicom's, and the warnings they raise (py.warnings).
_QUOTING_LOGGERS = frozenset({"pydicom", "highdicom", "py.warnings"})
_QUOTE_CHARACTER = re.compile(r"['\"]")
_PLACEHOLDER = "'<value>'"


def redact_quoted_values(message: str) -> str:
    """``message`` with everything from its first quote to its last replaced by ``'<value>'``.

    These libraries quote a value by ``repr`` or by hand, and a value may hold quotes, backslashes and
    newlines of its own: no pattern can tell where such a value ends, but every quoted value lies between
    the message's first quote and its last.  A message with a single quote (cut short) is kept up to it.
    """
    quotes = [match.start() for match in _QUOTE_CHARACTER.finditer(message)]
    if not quotes:
        return message
    after = message[quotes[-1] + 1 :] if len(quotes) > 1 else ""
    return message[: quotes[0]] + _PLACEHOLDER + after


def _drop_quoted_values(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace every quoted value in a pydicom, highdicom or warnings message with ``'<value>'``: they quote
    the attribute's value, which may be the patient's name, ID or birth date."""
    logger = str(event_dict.get("logger", ""))
    if any(logger == name or logger.startswith(f"{name}.") for name in _QUOTING_LOGGERS):
        event = event_dict.get("event")
        if isinstance(event, str):
            event_dict["event"] = redact_quoted_values(event)
    return event_dict


def configure_logging(level: str = "INFO", *, json_output: bool | None = None) -> None:
    """Route structlog and stdlib logging through one formatter on stderr.

    :param level: The minimum level for our loggers; pynetdicom is held at WARNING unless DEBUG.
    :param json_output: ``None`` chooses JSON when stderr is not a TTY.
    """
    if json_output is None:
        json_output = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
        _drop_quoted_values,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Structured tracebacks without local variables: locals can hold patient data.
            *(
                [
                    structlog.processors.ExceptionRenderer(
                        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
                    )
                ]
                if json_output
                else []
            ),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO, including dataset summaries; keep it quiet by default.
    logging.getLogger("pynetdicom").setLevel(level if level == "DEBUG" else "WARNING")
    # highdicom narrates every attribute it copies at INFO.
    logging.getLogger("highdicom").setLevel(level if level == "DEBUG" else "WARNING")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
