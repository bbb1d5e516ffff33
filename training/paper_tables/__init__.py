"""The papers' reported results, one JSON file per architecture (read by :mod:`training.metrics`)."""
