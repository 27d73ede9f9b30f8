"""The one settings object.

Built from ``config/default.yaml``, then an optional overlay file (``--config`` or
``HYPERREC_CONFIG``, e.g. ``config/stack.yaml``), then ``HYPERREC_<SECTION>__<KEY>``
environment variables, which win.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparkSettings(_Section):
    master: str = "local[*]"
    driver_memory: str = "2g"
    shuffle_partitions: int = 8


class AirflowSettings(_Section):
    sql_alchemy_conn: str | None = None


class MlflowSettings(_Section):
    tracking_uri: str | None = None
    artifact_root: str | None = None
    experiment: str = "hyperrec"
    registered_model: str = "hyperrec-recommender"


class OnlineStoreSettings(_Section):
    url: str | None = None


class ObjectStoreSettings(_Section):
    uri: str | None = None
    s3_endpoint_url: str | None = None


ImputeStrategy = Literal["mean", "median", "mode", "knn", "none"]
NUMERIC_IMPUTABLE = {"dwell_time_s", "scroll_depth", "age"}
IMPUTABLE = NUMERIC_IMPUTABLE | {"device", "gender", "occupation", "region"}


class PreprocessSettings(_Section):
    hash_algorithm: Literal["md5", "sha256"] = "md5"
    future_tolerance_s: int = 86400
    max_dwell_time_s: float = Field(86400.0, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # Strategy per column: mean/median (numeric), mode (any), knn (users.age, from the
    # other demographics), none. Interaction columns are imputed for implicit events only.
    impute: dict[str, ImputeStrategy] = Field(default_factory=lambda: {
        "dwell_time_s": "median", "scroll_depth": "median", "device": "mode",
        "age": "knn", "gender": "mode", "occupation": "mode", "region": "mode",
    })
    knn_neighbours: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _strategies_fit_columns(self) -> "PreprocessSettings":
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
    k: int = Field(10, ge=1)
    ease_lambda: float = Field(500.0, gt=0)
    knn_neighbours: int = Field(50, ge=1)


class PromotionSettings(_Section):
    min_ndcg_gain: float = 0.0


class DriftSettings(_Section):
    ks_threshold: float = Field(0.05, gt=0, lt=1)
    drift_share: float = Field(0.3, gt=0, le=1)


class ServingSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 10


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
    promotion: PromotionSettings = PromotionSettings()
    drift: DriftSettings = DriftSettings()
    serving: ServingSettings = ServingSettings()
    synthetic: SyntheticSettings = SyntheticSettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Environment variables override the YAML values passed in as init kwargs.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _absolute_paths(self) -> "Settings":
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
    def mlflow_tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> str:
        return self.mlflow.artifact_root or str(self.home / "mlflow" / "artifacts")

    @property
    def object_store_uri(self) -> str:
        return self.object_store.uri or str(self.home / "bundles")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings: default.yaml, then the overlay ``config`` (or ``$HYPERREC_CONFIG``),
    then keyword ``overrides`` (nested dicts), with ``HYPERREC_*`` env vars on top."""
    data = _read_yaml(DEFAULT_CONFIG)
    overlay = config or os.environ.get("HYPERREC_CONFIG")
    if overlay:
        data = _deep_merge(data, _read_yaml(Path(overlay)))
    data = _deep_merge(data, overrides)
    return Settings(**data)
