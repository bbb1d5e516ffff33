"""The exception hierarchy shared by the gateway, the plugins and the workers."""

from __future__ import annotations


class PacsTriageError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(PacsTriageError):
    """The configuration is invalid; start-up stops with this message."""


class StartupError(PacsTriageError):
    """A component cannot start (port in use, unreadable TLS key, bad plugin settings)."""


class MessageError(PacsTriageError):
    """A queue message cannot be decoded (unknown schema version, missing field)."""


class TransientError(PacsTriageError):
    """Worth retrying: the PACS or the broker is down, a disk is briefly full."""


class PermanentError(PacsTriageError):
    """Retrying cannot help: bad input, an unsupported SOP class, a corrupt file."""


class PluginError(PacsTriageError):
    """A model plugin failed; ``plugin_name`` says which one."""

    def __init__(self, plugin_name: str, message: str) -> None:
        super().__init__(f"plugin {plugin_name!r}: {message}")
        self.plugin_name = plugin_name


def failure_reason(doing: str, exc: BaseException) -> str:
    """A failure as the gateway stores or shows it: *doing* (our own words) and the exception's type.

    Only the project's own errors (:class:`PacsTriageError`, whose messages we write) keep their
    message.  A foreign exception's message may quote the data set: pydicom's "Unable to convert
    '1958-11-23' to 'DA' object" carries a birth date.  ``plugins.types.failure_reason`` is the
    same rule for the workers, which also name a GPU's out-of-memory error; the gateway never
    imports plugins.

    :param doing: What was being done, e.g. ``"undecodable"``.
    :param exc: What was raised.
    """
    kind = type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"{doing}: out of memory ({kind})"
    if isinstance(exc, PacsTriageError):
        return f"{doing}: {kind}: {exc}"
    return f"{doing}: {kind}"
