"""The triage flag to the RIS: HL7 v2 over MLLP, against a real listener built on python-hl7's MLLP server.

The listener (:class:`tests.peers.MllpListener`) runs ``hl7.mllp.start_hl7_server`` on a free loopback port in a
thread of its own, records every message it parses and answers with the ACK code it is told to
(``AA``, ``AE``, or nothing at all).  The Celery tests run a real worker on the test's private Redis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pytest
import yaml

from gateway.settings import Hl7Endpoint, NotificationsSettings, load_settings
from plugins.types import ScoreMeaning
from tests.peers import MllpListener
from workers.notify import (
    NotificationRefused,
    StudyNotice,
    build_message,
    control_id,
    interim_decision,
    read_ack,
    send,
    wants_notification,
)
from workers.triage import TriageDecision

pytestmark = pytest.mark.timeout(300)


def notice(
    category: str = "high", accession: str = "ACC0001", study_uid: str = "1.2.826.0.1.3680043.10.1"
) -> StudyNotice:
    risk = {"high": 0.91, "intermediate": 0.4, "routine": 0.05}[category]
    decision = interim_decision({"asg_mammonet": risk, "lem": risk / 2}, high_risk_threshold=0.7)
    return StudyNotice.from_decision(
        job_id=f"job-{accession}",
        study_uid=study_uid,
        accession_number=accession,
        patient_id="PAT-1",
        decision=decision,
    )


def endpoint(port: int, message: str = "ORU^R01", name: str = "ris", timeout: float = 5.0) -> Hl7Endpoint:
    return Hl7Endpoint(
        name=name,
        host="127.0.0.1",
        port=port,
        message=message,
        timeout_seconds=timeout,
    )


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize("kind", ["ORU^R01", "ORM^O01", "OMI^O23"])
def test_each_message_kind_is_keyed_on_accession_and_study_uid_and_carries_the_triage(kind: str) -> None:
    study = notice("high", accession="A|B^1")  # separators in a value must arrive escaped, not split it
    message = hl7.parse(str(build_message(study, endpoint(2575, kind), "S")))
    assert str(message.segment("MSH")(9)).startswith(kind)
    assert str(message.segment("MSH")(10)) == control_id(study, endpoint(2575, kind))
    obr = message.segment("OBR")
    assert message.unescape(str(obr(3))) == "A|B^1"
    assert str(obr(5)) == "S"
    text = str(message)
    assert study.study_uid in text
    observations = {str(s(3)(1)(1)): message.unescape(str(s(5))) for s in message.segments("OBX")}
    assert observations["TRIAGE_CATEGORY"] == "high"
    assert float(observations["RISK"]) == pytest.approx(study.risk, abs=1e-4)
    assert observations["MODEL"] == "asg_mammonet"
    assert observations["PRIORITY"] == "S"
    assert observations["STUDY_UID"] == study.study_uid
    if kind == "OMI^O23":
        ipc = message.segment("IPC")
        assert str(ipc(3)) == study.study_uid and str(message.segment("TQ1")(9)) == "S"
    else:
        assert str(message.segment("ZDS")(1)(1)(1)) == study.study_uid


def test_the_site_maps_each_category_to_its_priority_and_chooses_what_to_notify() -> None:
    settings = NotificationsSettings(hl7=(endpoint(2575),), priorities={"high": "S", "intermediate": "R"})
    assert settings.priority_for("high") == "S"
    assert settings.priority_for("intermediate") == "R"
    assert settings.priority_for("routine") == "R"  # left out of the map: routine
    assert wants_notification(settings, "high") and not wants_notification(settings, "routine")
    everything = settings.model_copy(update={"notify": "all"})
    assert all(wants_notification(everything, c) for c in ("high", "intermediate", "routine"))
    assert not wants_notification(NotificationsSettings(notify="all"), "high")  # no endpoint, nothing to send


def test_the_interim_decision_follows_the_triage_thresholds() -> None:
    assert interim_decision({"a": 0.8, "b": 0.2}, 0.7).category == "high"
    assert interim_decision({"a": 0.8, "b": 0.2}, 0.7).model == "a"
    assert interim_decision({"a": 0.4}, 0.7).category == "intermediate"
    assert interim_decision({"a": 0.1}, 0.7).category == "routine"
    empty = interim_decision({"a": None}, 0.7)
    assert isinstance(empty, TriageDecision) and empty.category == "routine" and empty.model is None


def test_settings_accept_the_notifications_section_and_refuse_a_duplicate_endpoint_name(
    tmp_path: Path,
) -> None:
    config = tmp_path / "n.yaml"
    config.write_text("notifications: {hl7: [{name: ris, host: 127.0.0.1, port: 2575}], notify: all}\n")
    settings = load_settings(config, environ={})
    assert settings.notifications.notify == "all"
    assert settings.notifications.hl7[0].message == "ORU^R01"
    assert load_settings(None, environ={}).notifications.notify == "high-risk"
    config.write_text(
        "notifications: {hl7: [{name: ris, host: a, port: 1}, {name: ris, host: b, port: 2}]}\n"
    )
    with pytest.raises(Exception, match="unique"):
        load_settings(config, environ={})


# ------------------------------------------------------------------ MLLP


def test_the_ris_receives_the_oru_and_its_ack_is_read() -> None:
    study = notice("high")
    with MllpListener("AA") as ris:
        target = endpoint(ris.port)
        ack = send(target, build_message(study, target, "S"))
        assert ack.accepted
        assert len(ris.received) == 1
        got = ris.received[0]
        assert str(got.segment("MSH")(9)).startswith("ORU^R01")
        assert str(got.segment("OBR")(3)) == study.accession_number
        assert study.study_uid in str(got)


@pytest.mark.parametrize("answer", ["AE", "AR", "silent"])
def test_a_nak_or_a_silent_ris_is_refused_in_our_own_words(answer: str) -> None:
    study = notice("high")
    with MllpListener(answer) as ris:
        # Only the silent RIS waits out the timeout: a loaded machine must not turn an AE into a silence.
        target = endpoint(ris.port, timeout=1.0 if answer == "silent" else 30.0)
        with pytest.raises(NotificationRefused) as refused:
            send(target, build_message(study, target, "S"))
        assert len(ris.received) == 1
    reason = str(refused.value)
    assert study.accession_number not in reason and "PAT-1" not in reason
    assert ("no ACK" in reason) if answer == "silent" else (answer in reason)


def test_an_ack_for_another_message_is_not_an_acceptance() -> None:
    sent = build_message(notice("high"), endpoint(2575), "S")
    other = build_message(notice("high", accession="OTHER"), endpoint(2575), "S")
    assert read_ack(sent.create_ack("AA"), str(sent.segment("MSH")(10))).accepted
    assert not read_ack(other.create_ack("AA"), str(sent.segment("MSH")(10))).accepted


def test_an_unreachable_ris_is_refused() -> None:
    with MllpListener("AA") as ris:
        port = ris.port
    target = endpoint(port, timeout=0.5)
    with pytest.raises(NotificationRefused):  # refused, or (rarely) whatever took the port since
        send(target, build_message(notice(), target, "S"))


# ------------------------------------------------------------ Celery: order, retries, dead letters, replay


def write_config(tmp_path: Path, redis_url: str, endpoints: list[dict[str, Any]], kind: str = "hl7") -> Path:
    """A worker's config with *endpoints* under ``notifications.<kind>`` (``hl7`` or ``fhir``)."""
    config = tmp_path / "notify.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"data_dir": str(tmp_path / "data")},
                "broker": {"url": redis_url},
                "dispatch": {"kind": "celery"},
                "logging": {"level": "INFO", "json_output": True},
                "plugins": {"load_entrypoints": False, "allow_demo_weights": True},
                "delivery": {"max_retries": 2, "backoff_base_seconds": 0.05, "backoff_max_seconds": 0.2},
                "notifications": {kind: endpoints, "notify": "all"},
            }
        )
    )
    return config


def queue_notice(
    app: Any, study: StudyNotice, endpoint_name: str, priority: int, score: ScoreMeaning | None = None
) -> None:
    """Queue the ``notify`` task as the analysis does (with what the risk means, for FHIR)."""
    kwargs: dict[str, Any] = {"notice": study.to_json_dict(), "endpoint": endpoint_name}
    if score is not None:
        kwargs["score"] = score.to_json_dict()
    app.send_task(
        "workers.tasks.notify",
        kwargs=kwargs,
        queue="delivery",
        priority=priority,
    )


@pytest.mark.redis
def test_the_high_risk_studys_oru_overtakes_routine_ones_waiting(tmp_path: Path, redis_url: str) -> None:
    from gateway.messages import Priority
    from tests.test_triage_order import start_worker, stop
    from tests.utils import wait_for
    from workers.app import configure_app
    from workers.results import ResultsStore

    with MllpListener("AA") as ris:
        config = write_config(tmp_path, redis_url, [{"name": "ris", "host": "127.0.0.1", "port": ris.port}])
        app = configure_app(load_settings(config, environ={}))
        routine = [notice("routine", accession=f"R{i:03d}", study_uid=f"1.2.3.{i}") for i in range(3)]
        high = notice("high", accession="H001", study_uid="1.2.3.99")
        for study in routine:  # queued first, while no worker runs
            queue_notice(app, study, "ris", int(Priority.ROUTINE))
        queue_notice(app, high, "ris", int(Priority.STAT))
        store = ResultsStore(tmp_path / "data" / "results.sqlite")

        def all_notified() -> bool:
            notified = store.notified_endpoints()
            return all(notified.get(s.job_id) == ["ris"] for s in [*routine, high])

        worker = start_worker(config, "delivery", tmp_path / "worker.log")
        try:
            wait_for(lambda: len(ris.received) >= 4, timeout=120, interval=0.1)
            # The worker records a notice once the RIS has acknowledged it, a moment after the listener has it:
            # stopping the worker before then can cut the last task short (it would run again, at least once).
            wait_for(all_notified, timeout=60, interval=0.1)
        finally:
            stop(worker)
        order = [str(m.segment("OBR")(3)) for m in ris.received]
        assert order[0] == "H001", order
        assert sorted(order[1:]) == ["R000", "R001", "R002"]


@pytest.mark.redis
def test_a_nak_and_a_silent_ris_are_retried_then_dead_lettered_and_replay_works(
    tmp_path: Path, redis_url: str
) -> None:
    from tests.test_triage_order import start_worker, stop
    from tests.utils import wait_for
    from workers.app import configure_app
    from workers.commands import replay_dead_letter
    from workers.results import ResultsStore

    with MllpListener("AE") as nak, MllpListener("silent") as silent:
        config = write_config(
            tmp_path,
            redis_url,
            [
                {"name": "nak", "host": "127.0.0.1", "port": nak.port, "timeout_seconds": 30},
                {"name": "silent", "host": "127.0.0.1", "port": silent.port, "timeout_seconds": 0.5},
            ],
        )
        app = configure_app(load_settings(config, environ={}))
        study = notice("high")
        queue_notice(app, study, "nak", 0)
        queue_notice(app, study, "silent", 0)
        store = ResultsStore(tmp_path / "data" / "results.sqlite")
        worker = start_worker(config, "delivery", tmp_path / "worker.log")
        try:
            wait_for(lambda: len(store.dead_letters()) == 2, timeout=120, interval=0.1)
            letters = store.dead_letters()
            # max_retries 2: the first try and two retries reached each RIS, then it was dead-lettered.
            assert len(nak.received) == 3 and len(silent.received) == 3
            assert {json.loads(letter["kwargs"])["endpoint"] for letter in letters} == {"nak", "silent"}
            assert all(letter["task"] == "notify" for letter in letters)
            assert {r["endpoint"]: r["status"] for r in store.notifications(study.job_id)} == {
                "nak": "dead-lettered",
                "silent": "dead-lettered",
            }
            assert all(study.accession_number not in letter["error"] for letter in letters)
            assert sum(e["event"] == "notification_retry" for e in store.timeline(study.job_id)) == 4

            nak.answer = "AA"  # the RIS is fixed; the operator replays its letter
            letter = next(letter for letter in letters if json.loads(letter["kwargs"])["endpoint"] == "nak")
            replay_dead_letter(store, app, int(letter["id"]))
            wait_for(
                lambda: (
                    {r["endpoint"]: r["status"] for r in store.notifications(study.job_id)}["nak"]
                    == "notified"
                ),
                timeout=60,
                interval=0.1,
            )
        finally:
            stop(worker)
        assert len(nak.received) == 4
        assert str(nak.received[-1].segment("MSH")(10)) == str(nak.received[0].segment("MSH")(10))
        assert store.notified_endpoints() == {study.job_id: ["nak"]}
        assert [d["id"] for d in store.dead_letters()] == [
            d["id"] for d in letters if json.loads(d["kwargs"])["endpoint"] == "silent"
        ]


@pytest.mark.redis
@pytest.mark.slow
def test_analysed_studies_reach_the_ris_high_risk_first_with_their_accession_numbers(
    tmp_path: Path, redis_url: str
) -> None:
    """The whole worker path: analysis queues one notification per study, and the delivery queue
    sends the high-risk study's ORU before those of the routine studies analysed before it."""
    from gateway.messages import InstanceRef, Priority, StudyJob
    from tests.test_triage_order import BUILTIN_MODELS, REPO, brightness_instance, start_worker, stop
    from tests.utils import wait_for, write
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher
    from workers.results import ResultsStore

    with MllpListener("AA") as ris:
        config = tmp_path / "e2e.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "gateway": {"data_dir": str(tmp_path / "data")},
                    "broker": {"url": redis_url},
                    "dispatch": {"kind": "celery"},
                    "logging": {"level": "INFO", "json_output": True},
                    "plugins": {
                        "drop_in_dir": str(REPO / "tests" / "triage_plugins"),
                        "load_entrypoints": False,
                        "disabled": BUILTIN_MODELS,
                        "allow_demo_weights": True,
                    },
                    "triage": {"first_stage_model": "triage_probe", "high_risk_threshold": 0.7},
                    "notifications": {
                        "hl7": [{"name": "ris", "host": "127.0.0.1", "port": ris.port}],
                        "notify": "all",
                    },
                }
            )
        )
        settings = load_settings(config, environ={})
        dispatcher = CeleryDispatcher(configure_app(settings))
        store_dir = tmp_path / "store"
        studies: dict[str, str] = {}  # accession number -> study UID
        for index in range(4):  # three routine studies, then the high-risk one
            ds = brightness_instance(bright=index == 3, seed=100 + index)
            ds.AccessionNumber = f"ACC{index:04d}"
            path = write(ds, store_dir)
            studies[ds.AccessionNumber] = str(ds.StudyInstanceUID)
            dispatcher.dispatch(
                StudyJob(
                    job_id=f"study-{index}",
                    study_instance_uid=str(ds.StudyInstanceUID),
                    study_version=1,
                    calling_ae="MODALITY",
                    priority=Priority.ROUTINE,
                    storage_root=str(store_dir),
                    instances=(
                        InstanceRef(
                            sop_instance_uid=str(ds.SOPInstanceUID),
                            sop_class_uid=str(ds.SOPClassUID),
                            series_instance_uid=str(ds.SeriesInstanceUID),
                            modality="MG",
                            path=path.name,
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                        ),
                    ),
                )
            )
        results = ResultsStore(tmp_path / "data" / "results.sqlite")
        log = tmp_path / "worker.log"
        analysis = start_worker(config, "analysis", log)
        try:
            wait_for(
                lambda: sum(r["state"] == "analysed" for r in results.worklist()) == 4,
                timeout=240,
                interval=0.2,
            )
        finally:
            stop(analysis)
        assert ris.received == []  # queued on the delivery queue, which nobody consumed yet
        delivery = start_worker(config, "delivery", log)
        try:
            # Acknowledged and recorded: the worker journals "notified" once the ACK is read.
            wait_for(lambda: len(results.notified_endpoints()) == 4, timeout=120, interval=0.1)
        finally:
            stop(delivery)
        accessions = [str(m.segment("OBR")(3)) for m in ris.received]
        assert accessions[0] == "ACC0003", accessions
        assert sorted(accessions) == sorted(studies)
        for message in ris.received:
            assert str(message.segment("MSH")(9)).startswith("ORU^R01")
            assert str(message.segment("ZDS")(1)(1)(1)) == studies[str(message.segment("OBR")(3))]
        category = {str(m.segment("OBR")(3)): str(m.segment("OBX")(5)) for m in ris.received}
        assert category["ACC0003"] == "high"
        assert all(category[a] != "high" for a in ("ACC0000", "ACC0001", "ACC0002"))
        assert set(results.notified_endpoints()) == {f"study-{i}" for i in range(4)}
        from workers.http import OpsData

        assert [row["notified"] for row in OpsData(settings).worklist()] == [True] * 4
