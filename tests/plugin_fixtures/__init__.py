"""Test fixtures for the plugin tests: DICOM generators, an out-of-tree plugin package, a drop-in module."""
