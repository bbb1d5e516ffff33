"""Suite-wide fixtures: strict pydicom, a running gateway, the peers' binaries and a private Redis."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from gateway.logging import configure_logging
from gateway.settings import Settings, load_settings
from tests.dispatchers import RecordingDispatcher
from tests.peers import RedisServer
from tests.utils import get_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _strict_pydicom() -> Iterator[None]:
    # highdicom's practice: fail on invalid values we write, rather than letting a PACS find them.
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    configure_logging("INFO", json_output=True)
    yield
    pydicom.config.settings.writing_validation_mode = old


@pytest.fixture(autouse=True)
def _own_address_space() -> Iterator[None]:
    """An in-process solo Celery worker caps this process's address space (worker_process_init);
    the cap must not outlive its test, or later tests and the children they start inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    yield
    if resource.getrlimit(resource.RLIMIT_AS) != (soft, hard):
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests: other jobs share the CI machine's two cores, and float sums
    then do not depend on the thread count."""
    import torch  # only the modules that ask for it pay for the import

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run .ci/run (it installs dcmtk, orthanc and dicom3tools)")
    return path


def gateway_settings(tmp_path: Path, **gateway: object) -> Settings:
    """Defaults with a free port, a temporary data dir and fast assembly."""
    base = load_settings(REPO / "configs" / "default.yaml", environ={})
    gw = base.gateway.model_copy(update={"port": get_port(), "data_dir": tmp_path / "data",
                                         "host": "127.0.0.1", **gateway})
    assembly = base.assembly.model_copy(update={"quiet_seconds": 1.0, "tick_seconds": 0.1})
    return base.model_copy(update={"gateway": gw, "assembly": assembly})


@pytest.fixture
def recording_dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private ``redis-server`` for the session, on a free port with its files under pytest's tmp dir.

    The suite never connects to a Redis it did not start: nothing need run on the machine, and no test
    can flush someone else's data.
    """
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=False)
    except FileNotFoundError as error:
        pytest.fail(str(error))
    with server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The broker URL of the session's private Redis, emptied before and after the test."""
    import redis  # the Celery extra's client; only the tests that use a broker pay for the import

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    try:
        yield redis_server.url
    finally:
        client.flushall()
        client.close()
