"""pacs-triage model plugins: the pluggy host, shared DICOM preprocessing and the built-in models.

Plugin authors write ``from plugins import hookimpl``.
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("pacs_triage")

__all__ = ["hookimpl"]
