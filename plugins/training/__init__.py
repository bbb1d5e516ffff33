"""Training and evaluation support: dataset adapters, patient-level splits and the papers' metrics.

The modules here use numpy, pydicom and OpenCV only, so they load without torch; the training loops that
need torch build on them.
"""

from __future__ import annotations
