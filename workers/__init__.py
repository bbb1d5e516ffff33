"""pacs-triage workers: Celery tasks, the analysis pipeline, DICOM outputs and delivery; the CLI composition root."""
