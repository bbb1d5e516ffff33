"""Property test of the C-STORE handler with malformed data sets: a status, never a crash or a half-file."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread

from gateway.handlers import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_INVALID_UID,
    STATUS_SUCCESS,
    STATUS_UID_MISMATCH,
    StoreHandler,
)
from gateway.journal import Journal
from gateway.spool import Spool
from tests.utils import make_instance

ALLOWED = {STATUS_SUCCESS, STATUS_CANNOT_UNDERSTAND, STATUS_INVALID_UID, STATUS_UID_MISMATCH}
BUDGET = int(os.environ.get("PACS_TRIAGE_FUZZ_EXAMPLES", "150"))

_TEMPLATE = make_instance(modality="MG", rows=8, cols=8)
_buffer = io.BytesIO()
_TEMPLATE.save_as(_buffer, enforce_file_format=True)
_FILE = _buffer.getvalue()
# Preamble (128) + "DICM" (4) + (0002,0000) UL element (12) + the group length it holds.
_META_END = 144 + int.from_bytes(_FILE[140:144], "little")


def _event(path: Path, sop_uid: str) -> SimpleNamespace:
    """The parts of a pynetdicom ``Event`` the handler reads, as the SCP would present them."""
    requestor = SimpleNamespace(ae_title="FUZZER", address="127.0.0.1")
    return SimpleNamespace(
        request=SimpleNamespace(AffectedSOPInstanceUID=sop_uid, AffectedSOPClassUID=_TEMPLATE.SOPClassUID, Priority=0),
        assoc=SimpleNamespace(requestor=requestor),
        dataset_path=path,
    )


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> StoreHandler:
    spool = Spool(tmp_path_factory.mktemp("fuzz"))
    return StoreHandler(spool, Journal(spool.journal_path))


mutations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=len(_FILE) - 1 - _META_END), st.binary(min_size=1, max_size=8)),
    min_size=1, max_size=6,
)


@settings(max_examples=BUDGET, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=mutations, truncate=st.one_of(st.none(), st.integers(min_value=0, max_value=len(_FILE) - _META_END)))
def test_store_handler_survives_mutated_datasets(handler: StoreHandler, mutations, truncate) -> None:
    body = bytearray(_FILE[_META_END:])
    for offset, patch in mutations:
        body[offset:offset + len(patch)] = patch
    if truncate is not None:
        body = body[:truncate]
    fd, name = tempfile.mkstemp(dir=handler.spool.incoming, suffix=".dcm")
    with os.fdopen(fd, "wb") as f:
        f.write(_FILE[:_META_END])
        f.write(bytes(body))
    status = handler(_event(Path(name), str(_TEMPLATE.SOPInstanceUID)))

    assert status in ALLOWED
    assert list(handler.spool.incoming.iterdir()) == []
    if status == STATUS_SUCCESS:
        row = handler.journal.find_instance(str(_TEMPLATE.SOPInstanceUID))
        assert row is not None
        assert dcmread(handler.spool.root / row["path"], stop_before_pixels=True).SOPInstanceUID == row["sop_uid"]


def test_template_is_accepted(handler: StoreHandler) -> None:
    fd, name = tempfile.mkstemp(dir=handler.spool.incoming, suffix=".dcm")
    with os.fdopen(fd, "wb") as f:
        f.write(_FILE)
    assert handler(_event(Path(name), str(_TEMPLATE.SOPInstanceUID))) == STATUS_SUCCESS

