"""pacs-triage gateway: DICOM receive, durable spool, study assembly and dispatch (never imports torch)."""
