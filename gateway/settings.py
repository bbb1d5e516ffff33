"""The one validated configuration schema, loaded from YAML plus ``PACS_TRIAGE_*`` overrides.

Every section forbids unknown keys, so a typo stops start-up with a message that names the
key and the file instead of being silently ignored.  Environment variables override any value:
``PACS_TRIAGE_GATEWAY__PORT=11113`` sets ``gateway.port`` (double underscore between levels,
the value parsed as a YAML scalar, so ``true``/``10``/``[a, b]`` work).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError

ENV_PREFIX = "PACS_TRIAGE_"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title_problem(value: str) -> str | None:
    """What PS3.5's AE value representation forbids in ``value``, or None."""
    if not value.strip(" "):
        return "it is empty or only spaces"
    if len(value) > 16:
        return "it is longer than 16 characters"
    if any(char == "\\" or not (" " <= char <= "~") for char in value):
        return "it holds a backslash, a control character or a character outside the default repertoire"
    return None


def _check_ae_title(value: str) -> str:
    # Our own check: pynetdicom's AE validator lives in a private module.
    problem = _ae_title_problem(value)
    if problem is not None:
        raise ValueError(f'AE title "{value}" is invalid: {problem}')
    return value


class AllowedCaller(_Section):
    """One entry of the calling-AE allow-list."""

    ae_title: str
    #: If not empty, the peer's IP address must be one of these.
    hosts: tuple[str, ...] = ()

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class TLSSettings(_Section):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    #: CA bundle used to verify client certificates (mutual TLS) or, for delivery, the PACS.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> TLSSettings:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("TLS is enabled but certificate or private_key is not set")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


class DiskWatermark(_Section):
    """Refuse new instances (0xA700) when free space on the spool falls below either bound."""

    min_free_bytes: int = Field(default=2 * 1024**3, ge=0)
    min_free_percent: float = Field(default=5.0, ge=0, le=100)


class GatewaySettings(_Section):
    ae_title: str = "PACS_TRIAGE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    #: Spool, journal and quarantine all live under this directory.
    data_dir: Path = Path("./var")
    #: None accepts any calling AE (with a warning at start-up); a list turns the allow-list on.
    allowed_callers: tuple[AllowedCaller, ...] | None = None
    #: SOP Class UIDs of private storage classes to accept in addition to the standard ones.
    private_sop_classes: tuple[str, ...] = ()
    max_associations: int = Field(default=16, ge=1)
    #: Simultaneous associations one peer host may hold; more are rejected (A-ASSOCIATE-RJ).
    max_associations_per_host: int = Field(default=8, ge=1)
    #: The most bytes a deflated data set may inflate to; larger ones are refused with 0xA700.
    #: The default is the largest object we accept (4 GiB, the most a 32-bit length describes).
    max_inflated_size: int = Field(default=4 * 2**30, ge=2**20)
    #: Largest PDU we announce.  Never unlimited: a peer may then send a whole multi-GB object
    #: as one PDU, which pynetdicom reads into memory before the spool sees it.
    max_pdu_size: int = Field(default=1_048_576, ge=4096, le=64 * 2**20)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    tls: TLSSettings = TLSSettings()
    disk_watermark: DiskWatermark = DiskWatermark()
    #: Number of receiving processes sharing the port (SO_REUSEPORT); 1 = in-process.
    receive_processes: int = Field(default=1, ge=1, le=64)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class QuietOverride(_Section):
    """A quiet time for studies from one calling AE and/or one modality."""

    calling_ae: str | None = None
    modality: str | None = None
    quiet_seconds: float = Field(gt=0)


class AssemblySettings(_Section):
    #: A study is complete after this many seconds without a new instance.
    quiet_seconds: float = Field(default=10.0, gt=0)
    quiet_overrides: tuple[QuietOverride, ...] = ()
    #: A study still receiving after this many seconds since its first instance is completed anyway.
    force_complete_seconds: float = Field(default=900.0, gt=0)
    #: Complete a mammogram at once when L/R x CC/MLO have all arrived.
    complete_on_four_views: bool = True
    #: How often the completion timers are checked.
    tick_seconds: float = Field(default=0.5, gt=0)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: None: JSON when stderr is not a TTY, readable text when it is.
    json_output: bool | None = None


class DispatchSettings(_Section):
    #: ``logging`` only records completed studies; ``celery`` queues them for workers.
    kind: Literal["logging", "celery"] = "celery"


class BrokerSettings(_Section):
    #: ``embedded`` = a SQLite file under data_dir (no service); else a kombu URL such as redis://host:6379/0.
    url: str = "embedded"
    visibility_timeout_seconds: int = Field(default=7200, gt=0)


class ModelSettings(_Section):
    enabled: bool = True
    weights: Path | None = None
    device: str | None = None
    batch_size: int = Field(default=8, ge=1)
    thresholds: dict[str, float] = {}
    options: dict[str, Any] = {}


class PluginSettings(_Section):
    #: Every module or package in this directory is loaded as a plugin.
    drop_in_dir: Path | None = None
    load_entrypoints: bool = True
    #: Run with randomly initialised weights when none are configured; every output says so.
    allow_demo_weights: bool = False
    #: Where the demo checkpoints live (made by ``pacs-triage demo-weights``).
    demo_weights_dir: Path | None = None
    #: Per-plugin settings keyed by plugin name.
    models: dict[str, ModelSettings] = {}
    #: Names of plugins that must not load.
    disabled: tuple[str, ...] = ()


class DestinationSettings(_Section):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSSettings = TLSSettings()
    #: After each delivery, ask for Storage Commitment (N-ACTION) and wait for the PACS's
    #: N-EVENT-REPORT; the delivery counts as committed only once every instance is confirmed.
    storage_commitment: bool = False
    #: Seconds to wait for the N-EVENT-REPORT; past it the delivery is retried with its backoff.
    commitment_timeout_seconds: float = Field(default=60.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class DeliverySettings(_Section):
    destinations: tuple[DestinationSettings, ...] = ()
    #: Our AE title on delivery associations, and the one a PACS reports Storage Commitment to.
    ae_title: str = "PACS_TRIAGE"
    #: The port the delivery worker listens on for Storage Commitment reports (N-EVENT-REPORT),
    #: opened only while it waits for one; the PACS must know this AE title, host and port.
    commitment_port: int = Field(default=11113, ge=1, le=65535)
    #: When a study's results change, send an IHE IOCM rejection KOS for our earlier SR and SCs.
    supersede: bool = False
    #: 16 tries with the default backoff span about 45 minutes of PACS outage on average.
    max_retries: int = Field(default=16, ge=0)
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    backoff_max_seconds: float = Field(default=600.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class WorkerSettings(_Section):
    device: str = "cpu"
    concurrency: int = Field(default=1, ge=1)
    soft_time_limit_seconds: int = Field(default=1200, gt=0)
    time_limit_seconds: int = Field(default=1500, gt=0)
    max_redeliveries: int = Field(default=3, ge=1)
    #: Pixel budget checked from the header before decoding: rows x columns x frames x bytes per
    #: sample of one image, and of all images of a study that a model accepts.  An image above it
    #: is skipped with that reason (a declared 60000 x 60000 image, a 5000-frame object).
    max_image_pixel_bytes: int = Field(default=1 << 30, gt=0)
    max_study_pixel_bytes: int = Field(default=4 << 30, gt=0)
    #: Address-space limit (RLIMIT_AS) of each pool process, in MiB; 0 = none.  An allocation
    #: above it fails as one image's out-of-memory failure instead of the kernel killing the
    #: process.  Not applied to CUDA workers: the CUDA runtime reserves far more address space.
    memory_limit_mb: int = Field(default=16384, ge=0)
    #: Decode and preprocess a model's next images on a thread of their own while it runs the current
    #: batch: ``auto`` on a CUDA device (its forward pass leaves the CPU idle), never on the CPU (the
    #: forward pass already has every core); ``on`` or ``off`` to choose.
    read_ahead: Literal["auto", "on", "off"] = "auto"


class RouteRule(_Section):
    """One routing rule: an image matches when every field that is set matches (empty = any)."""

    calling_aes: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    sop_class_uids: tuple[str, ...] = ()
    #: Body Part Examined or an Anatomic Region code value or meaning, upper case ("BREAST",
    #: "76752008"); a study from one of ``routing.breast_unit_aes`` counts as BREAST.
    body_parts: tuple[str, ...] = ()
    lateralities: tuple[str, ...] = ()


#: Rules a site gets unless ``routing.models.<name>`` replaces them: the breast ultrasound model
#: reads breast ultrasound only (never obstetric or thyroid), the mammography models MG only.
DEFAULT_ROUTES: dict[str, tuple[RouteRule, ...]] = {
    "us_fusion": (RouteRule(modalities=("US",), body_parts=("BREAST",)),),
    **{
        name: (RouteRule(modalities=("MG",)),)
        for name in ("asg_mammonet", "clgb_net", "lem", "hybrid_birads")
    },
}


class RoutingSettings(_Section):
    """Which images go to which model, beyond what each model itself accepts."""

    #: Calling AE titles of breast units: their ultrasound counts as breast without a body part.
    breast_unit_aes: tuple[str, ...] = ()
    #: Per model, the rules of which one must match; replaces that model's default rules, and an
    #: empty list lifts them.  Models with no rules here or in the defaults take what they accept.
    models: dict[str, tuple[RouteRule, ...]] = {}

    def rules_for(self, model: str) -> tuple[RouteRule, ...]:
        return self.models[model] if model in self.models else DEFAULT_ROUTES.get(model, ())


class TriageSettings(_Section):
    """How a study's triage category is decided (workers.triage.decide, docs/outputs.md "Triage").

    Each model's risk is read against that model's own operating points, never against another
    model's score: ``high`` at or above its ``high_operating_point``, ``intermediate`` at or above its
    ``intermediate_operating_point``, else ``routine``.
    """

    #: Kept so older configs load; the study's risk is no longer a max or mean of raw scores.
    policy: Literal["max", "mean"] = "max"
    #: The model that runs first on every study and sets the priority of the rest.
    first_stage_model: str | None = "asg_mammonet"
    #: The operating point (stored in the checkpoint by ``pacs-triage train``) that makes a study high.
    high_operating_point: str = "high_specificity"
    #: The operating point that makes a study intermediate.
    intermediate_operating_point: str = "high_sensitivity"
    #: Only for models whose weights bring no operating point (and no plugin threshold): high at or
    #: above this risk, intermediate at or above half of it.
    high_risk_threshold: float = Field(default=0.7, ge=0, le=1)
    #: Series/Study descriptions containing any of these words are queued as STAT.
    stat_keywords: tuple[str, ...] = ("STAT", "URGENT")


#: HL7 v2 ORC-7/TQ1-9/OBR-5 priority codes (table 0027) a triage category may map to.
Hl7Priority = Literal["S", "A", "R", "P", "C", "T"]


class Hl7Endpoint(_Section):
    """One RIS that takes the triage flag as HL7 v2 over MLLP."""

    #: Names the endpoint in dead letters, the timeline and the worklist.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    host: str
    port: int = Field(ge=1, le=65535)
    #: ``ORU^R01`` (a result), or an order update for sites whose RIS takes AI flags as orders.
    message: Literal["ORU^R01", "ORM^O01", "OMI^O23"] = "ORU^R01"
    #: How long to wait for the connection and then for the ACK; past it the try counts as failed.
    timeout_seconds: float = Field(default=10.0, gt=0)
    sending_application: str = "PACS_TRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    #: MSH-11: ``P`` production, ``T`` training, ``D`` debugging.
    processing_id: Literal["P", "T", "D"] = "P"


def _secret_problem(value: Any) -> str | None:
    """What is wrong with a value that may be a secret reference (``{"$env": VAR}`` or ``{"$file": path}``)."""
    if isinstance(value, str):
        return None
    if isinstance(value, dict) and len(value) == 1:
        ((key, target),) = value.items()
        if key in ("$env", "$file") and isinstance(target, str) and target:
            return None
    return 'must be a string, {"$env": VARIABLE} or {"$file": path}'


class FhirEndpoint(_Section):
    """One FHIR R4 server that takes the triage result as a transaction Bundle (workers/fhir.py)."""

    #: Names the endpoint in dead letters, the timeline and the worklist; unique across hl7 and fhir.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    #: The server's base URL; the Bundle is POSTed to it.
    base_url: str = Field(pattern=r"^https?://[^\s]+$")
    #: How long to wait for the connection and then for each read of the answer.
    timeout_seconds: float = Field(default=10.0, gt=0)
    #: Sent as ``Authorization: Bearer <token>``; a string, or a ``$env``/``$file`` reference resolved
    #: when the request is sent, so the token stays out of the configuration file.
    bearer_token: str | dict[str, str] | None = None
    #: Further request headers; each value a string or a ``$env``/``$file`` reference, like ``bearer_token``.
    headers: dict[str, str | dict[str, str]] = {}
    #: CA bundle that verifies an https server; none: the system's trusted CAs.
    ca_certificates: Path | None = None

    @field_validator("bearer_token")
    @classmethod
    def _token_reference(cls, value: Any) -> Any:
        problem = None if value is None else _secret_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("headers")
    @classmethod
    def _header_references(cls, value: dict[str, Any]) -> dict[str, Any]:
        for header, content in value.items():
            problem = _secret_problem(content)
            if problem is not None:
                raise ValueError(f"header {header} {problem}")
        return value

    def request_headers(self) -> dict[str, str]:
        """The configured headers with their secrets read now (an unset variable gives an empty value)."""
        headers = {name: str(_resolve_secrets(content)) for name, content in self.headers.items()}
        if self.bearer_token is not None:
            headers["Authorization"] = f"Bearer {_resolve_secrets(self.bearer_token)}"
        return headers


class NotificationsSettings(_Section):
    """The triage flag where the radiologist reads: HL7 v2 messages to the RIS and FHIR R4 resources to a
    FHIR server, sent per study."""

    hl7: tuple[Hl7Endpoint, ...] = ()
    fhir: tuple[FhirEndpoint, ...] = ()
    #: ``high-risk`` notifies only studies whose triage category is high; ``all`` every analysed study.
    notify: Literal["high-risk", "all"] = "high-risk"
    #: The HL7 priority each triage category is sent with (S stat, A ASAP, R routine).
    priorities: dict[Literal["high", "intermediate", "routine"], Hl7Priority] = {
        "high": "S",
        "intermediate": "A",
        "routine": "R",
    }

    @model_validator(mode="after")
    def _unique_names(self) -> NotificationsSettings:
        names = [endpoint.name for endpoint in self.hl7] + [endpoint.name for endpoint in self.fhir]
        if len(set(names)) != len(names):
            raise ValueError(
                "notifications.hl7 and notifications.fhir names must be unique across both lists: "
                "a dead letter names its endpoint"
            )
        return self

    def priority_for(self, category: str) -> str:
        """The HL7 priority of *category*; routine (``R``) for a category the map leaves out."""
        return next((code for name, code in self.priorities.items() if name == category), "R")

    def hl7_endpoint(self, name: str) -> Hl7Endpoint | None:
        return next((endpoint for endpoint in self.hl7 if endpoint.name == name), None)

    def fhir_endpoint(self, name: str) -> FhirEndpoint | None:
        return next((endpoint for endpoint in self.fhir if endpoint.name == name), None)


class HttpSettings(_Section):
    """The operations web service (``pacs-triage serve-http``): worklist page, JSON API and /metrics."""

    #: Whether ``pacs-triage up`` starts the web service too; ``serve-http`` always runs it.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    #: Bearer tokens accepted on every endpoint but health and readiness.  Several may be valid
    #: at once, so a token is rotated by adding the new one, moving clients, then removing the old.
    #: Empty: ``serve-http`` makes a random token for its run and prints it.
    tokens: tuple[str, ...] = ()

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens_as_strings(cls, value: Any) -> Any:
        # From the environment a single token arrives as a scalar, and an all-digit one as an int.
        if value is None:
            return ()
        if isinstance(value, (str, int)):
            value = [value]
        if isinstance(value, (list, tuple)):
            tokens = tuple(str(v) for v in value)
            if any(not t.strip() for t in tokens):
                raise ValueError("an empty token would let anyone in")
            return tokens
        return value


class CadSrSettings(_Section):
    """The study's Mammography CAD SR (docs/outputs.md "Mammography CAD SR")."""

    #: Build a Mammography CAD SR for every study with MG images (with ``report: study``).
    enabled: bool = True
    #: Manufacturer (0008,0070) and Manufacturer's Model Name (0008,1090) of the CAD SR: some PACS take CAD SR
    #: only from the vendors on their list.  Our own outputs stay recognisable by their Contributing Equipment.
    manufacturer: str = Field(
        default="pacs-triage", min_length=1, max_length=64, pattern=r"^[^\\\x00-\x1f]+$"
    )
    model_name: str = Field(
        default="pacs-triage CAD", min_length=1, max_length=64, pattern=r"^[^\\\x00-\x1f]+$"
    )
    #: At most this many heatmap peaks per image and model become marks (models without their own points).
    max_peaks: int = Field(default=3, ge=0, le=20)

    @field_validator("manufacturer", "model_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class OutputsSettings(_Section):
    """What the worker sends back to the PACS for each study."""

    #: ``study``: one SR per study holding every model's results, built once every stage is done;
    #: ``per-model``: one SR per model (and each model's heatmaps in a series of its own).
    report: Literal["study", "per-model"] = "study"
    #: The model whose heatmap SCs make the study's heatmap series; empty: the model that set the study's
    #: triage, else the first model that read it.  Ignored with ``report: per-model`` (every model's).
    heatmap_model: str = ""
    #: At most this many localisation points per image and model in the SR (highest score first).
    max_points: int = Field(default=5, ge=0, le=100)
    #: The further maps a model computes (saliency, SHAP, attention, score map): ``none``, or one Secondary
    #: Capture per map in the model's extra-map series (for the heatmap model; every model's when per-model).
    extra_maps: Literal["none", "secondary_capture"] = "none"
    #: The Mammography CAD SR of a mammography study.
    cad_sr: CadSrSettings = CadSrSettings()


class Settings(_Section):
    gateway: GatewaySettings = GatewaySettings()
    assembly: AssemblySettings = AssemblySettings()
    logging: LoggingSettings = LoggingSettings()
    dispatch: DispatchSettings = DispatchSettings()
    broker: BrokerSettings = BrokerSettings()
    plugins: PluginSettings = PluginSettings()
    delivery: DeliverySettings = DeliverySettings()
    worker: WorkerSettings = WorkerSettings()
    routing: RoutingSettings = RoutingSettings()
    triage: TriageSettings = TriageSettings()
    http: HttpSettings = HttpSettings()
    outputs: OutputsSettings = OutputsSettings()
    notifications: NotificationsSettings = NotificationsSettings()

    #: The file this was loaded from, for messages; not a config key.
    source: str = Field(default="<defaults>", exclude=True)

    def plugin_config(self, name: str) -> ModelSettings:
        """Return the settings of plugin *name*, with ``$env``/``$file`` secrets resolved."""
        model = self.plugins.models.get(name, ModelSettings())
        return model.model_copy(update={"options": _resolve_secrets(model.options)})


def _resolve_secrets(value: Any) -> Any:
    # datasette's indirection: {"$env": "VAR"} or {"$file": "/path"} keeps secrets out of config files.
    if isinstance(value, dict):
        if set(value) == {"$env"}:
            return os.environ.get(value["$env"], "")
        if set(value) == {"$file"}:
            return Path(value["$file"]).read_text().strip()
        return {k: _resolve_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_secrets(v) for v in value]
    return value


def _apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> list[str]:
    applied = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
        applied.append(".".join(path))
    return applied


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Load and validate the configuration.

    :param path: A YAML file; ``None`` means ``$PACS_TRIAGE_CONFIG`` or ``configs/default.yaml``.
    :param environ: The environment to read overrides from (``os.environ`` by default).
    :param overrides: Dotted keys set last, e.g. ``{"gateway.port": 11113}`` from CLI flags.
    :raises ConfigError: naming the file and the key, on unknown keys or bad values.
    """
    environ = dict(os.environ if environ is None else environ)
    if path is None:
        path = environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {source}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {source} must hold a mapping at the top level")
    env_keys = _apply_env_overrides(data, environ)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if env_keys:
        source = f"{source} (with environment overrides: {', '.join(env_keys)})"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    # Relative paths stay relative to the working directory, as a shell user expects.
    return settings.model_copy(update={"source": source})
