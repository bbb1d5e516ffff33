"""The real validators as test helpers: each returns the lines it reports, for the test to assert on.

dciodvfy comes from dicom3tools; PixelMed's DicomSRValidator from Debian's ``pixelmed-apps``.  A test
skips (through :func:`tests.conftest.require_binary` or :func:`require_pixelmed`) when one is missing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_binary

#: Where Debian's pixelmed-apps puts the jars the validator needs.
PIXELMED_JARS = (
    "/usr/share/java/pixelmed.jar",
    "/usr/share/java/commons-codec.jar",
    "/usr/share/java/commons-compress.jar",
)
#: Current Java caps XPath expressions far below what the validator's template rules need.
_XPATH_UNLIMITED = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's (error lines, warning lines) for *path*."""
    binary = require_binary("dciodvfy")
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [
        line for line in lines if line.startswith("Warning")
    ]


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for *path*."""
    return dciodvfy(path)[0]


def require_pixelmed() -> str:
    """The class path of PixelMed's jars, or skip the test when Java or pixelmed-apps is missing."""
    java = require_binary("java")
    if not all(os.path.exists(jar) for jar in PIXELMED_JARS[:1]):
        pytest.skip("PixelMed (Debian pixelmed-apps) is not installed")
    del java
    return ":".join(jar for jar in PIXELMED_JARS if os.path.exists(jar))


def default_heap() -> str:
    """The validator's heap: it holds an SR's whole content tree as XML and runs out of 1 GiB on a study SR of
    four models; 4 GiB, or less when the machine has less free (at least 1 GiB)."""
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return "2g"
    return f"{max(1, min(4, available // 2**20 - 2))}g"


def pixelmed_sr(path: Path, heap: str = "") -> list[str]:
    """Every line DicomSRValidator prints for *path* ("IOD validation complete" last when it finished)."""
    classpath = require_pixelmed()
    run = subprocess.run(
        [
            "java",
            *_XPATH_UNLIMITED,
            f"-Xmx{heap or default_heap()}",
            "-cp",
            classpath,
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    return (run.stdout + run.stderr).splitlines()


def pixelmed_sr_errors(path: Path, heap: str = "") -> list[str]:
    """DicomSRValidator's error lines for *path*; an unfinished run counts as an error."""
    lines = pixelmed_sr(path, heap)
    errors = [line for line in lines if line.startswith("Error") or " Error" in line.split(":", 1)[0]]
    if not any(line.startswith("IOD validation complete") for line in lines):
        errors.append("DicomSRValidator did not finish: " + " | ".join(lines[-5:]))
    return errors
