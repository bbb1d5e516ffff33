"""Security: no patient name, ID or birth date in any log, even on the error paths most likely to print one.

Every :class:`~tests.faults_harness.Pipeline` of this suite greps its processes' logs (gateway, workers,
storescu) for the patient data it sent when it closes, so each fault scenario checks this too.  This test
goes looking for leaks on purpose: patient attributes with values a conformant modality would never send
(too long, the wrong date format, stray characters), which make pydicom and highdicom warn or raise
with the value in the message, plus data sets the gateway refuses for undecodable bytes, bad UIDs and a
UID mismatch.  The rest of the security scenarios already have tests (``docs/reliability.md``): an unknown
calling AE (``tests/test_gateway_scp.py``), TLS with a wrong client certificate
(``tests/test_gateway_tls_memory.py``) and the HTTP API without a token (``tests/test_http.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.logging import redact_quoted_values
from tests.faults_harness import Pipeline, phi_study

pytestmark = [pytest.mark.redis, pytest.mark.peers]


def _nonconformant_patient(number: int) -> list[pydicom.Dataset]:
    study = phi_study(number, seed=number)
    for ds in study:
        ds.PatientName = (
            f"SYNTH^PATIENT{number:04d}^" + "LONGMIDDLENAME" * 6
        )  # a component over 64 characters
        ds.PatientID = f"PID{number:04d}-" + "9" * 70  # LO allows 64
        ds.PatientBirthDate = f"19{50 + number % 40:02d}-03-04"  # ISO, not DICOM's YYYYMMDD
        ds.OtherPatientIDs = f"OTHER{number:05d}"
        ds.PatientAddress = f"{number} SYNTHETIC ROAD"
    return study


def _garbled_after_patient_name(ds: pydicom.Dataset, directory: Path) -> Path:
    """*ds* as a file whose Patient ID element claims a length far past the end of the data."""
    path = directory / "garbled.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    tag = b"\x10\x00\x20\x00LO"  # (0010,0020) Patient ID, explicit VR little endian
    at = data.index(tag) + len(tag)
    data[at : at + 2] = b"\xff\x7f"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
def test_no_patient_data_in_any_log_even_on_error_paths(tmp_path: Path) -> None:
    with Pipeline(tmp_path) as pipeline:
        pipeline.start_gateway()
        pipeline.start_worker()
        good = phi_study(60, seed=3)
        odd = _nonconformant_patient(61)
        with warnings.catch_warnings(), pydicom.config.disable_value_validation():
            warnings.simplefilter("ignore")
            statuses = pipeline.c_store(good + odd)
        assert statuses == [0x0000] * 8

        # Refusals: a UID that is not one, and bytes that do not decode, right after the patient's name.
        bad_uid, garbled = phi_study(62, seed=4)[:2]
        bad_uid.SeriesInstanceUID = "1.2.03.4"
        assert pipeline.c_store([bad_uid]) == [0xC220]
        # The oversized Patient ID swallows the UIDs after it: undecodable (0xC210) or without UIDs (0xC220).
        assert pipeline.c_store_file(_garbled_after_patient_name(garbled, tmp_path)) in (0xC210, 0xC220)

        uids = [str(good[0].StudyInstanceUID), str(odd[0].StudyInstanceUID)]
        pipeline.wait_settled(uids, timeout=90)
        pipeline.check_invariant(uids)
        assert pipeline.phi >= {"SYNTH^PATIENT0060", "PATIENT0061", odd[0].PatientID, odd[0].PatientBirthDate}
    # Leaving the with block greps every log for pipeline.phi (faults_harness.assert_no_phi_in_logs).


def test_values_pydicom_and_highdicom_quote_never_reach_a_log_line() -> None:
    """pydicom's validation warnings quote the value ("Invalid value for VR DA: '1958-11-23'."), through its
    logger and through the warnings module; the log line keeps the message and drops the value."""
    script = (
        "import logging, warnings\n"
        "from gateway.logging import configure_logging\n"
        "configure_logging('INFO', json_output=True)\n"
        "logging.captureWarnings(True)\n"
        "import pydicom\n"
        "ds = pydicom.Dataset()\n"
        "ds.PatientBirthDate = '1958-11-23'\n"
        "ds.PatientName = 'DOE^JANE' * 10\n"
        "logging.getLogger('highdicom.sr').warning(\"Value %r of Patient's Name is odd\", \"O'BRIEN^JO\")\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                               cwd=Path(__file__).resolve().parents[1])
    assert completed.returncode == 0, completed.stderr
    assert "Invalid value for VR DA" in completed.stderr and "Value '<value>'" in completed.stderr
    for value in ("1958-11-23", "DOE^JANE", "BRIEN^JO"):
        assert value not in completed.stderr


@pytest.mark.parametrize(
    "value",
    [
        "O'BRIEN \"JO\"",  # both quotes: repr escapes the one it quotes with
        "1.2.3 \x00\x10\x00SH'\\",  # a UID run into the next elements, with a quote and a backslash
        "ANN\nLEE",
        "O'BRIEN",
    ],
)
@pytest.mark.parametrize(
    "template",
    [
        "Invalid value for VR PN: {quoted}. Please see the standard.",
        "Unable to convert {quoted} to 'DA' object",
        "The value length (9) exceeds the maximum. Invalid value for VR UI: {quoted}",
        "Value {quoted} of Patient's Name is odd",
    ],
)
@pytest.mark.parametrize("quoting", [repr, lambda value: f"'{value}'", lambda value: f'"{value}"'])
def test_a_quoted_value_never_survives_redaction(value: str, template: str, quoting: Any) -> None:
    """Values quoted by repr, or by hand between either quote, with quotes, backslashes and newlines of their
    own: the redacted message holds no piece of them, and keeps what comes before the first quote."""
    message = template.format(quoted=quoting(value))
    redacted = redact_quoted_values(message)
    for piece in re.split(r"[\s'\"\\]+", value):
        if len(piece) > 1:
            assert piece not in redacted, (message, redacted)
    assert redacted.startswith(template[: template.index("{")].split("'")[0])


def test_redaction_keeps_the_message_around_the_values() -> None:
    assert redact_quoted_values("Invalid value for VR DA: '1958-11-23'. Please see part 5.") == (
        "Invalid value for VR DA: '<value>'. Please see part 5."
    )
    assert redact_quoted_values("The value length (72) exceeds the maximum") == (
        "The value length (72) exceeds the maximum"
    )
