"""pacs-triage gateway: DICOM receive, durable spool, study assembly and dispatch (never imports torch)."""

from importlib.metadata import version

#: The installed distribution's version (pyproject.toml is its one source).
__version__ = version("pacs-triage")
