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
