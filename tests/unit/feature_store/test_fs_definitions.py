import pytest

from core.schemas import DEVICES
from feature_store.definitions import USER_FEATURES, FeatureDef, feature_columns


def test_definition_names_are_unique():
    names = [d.name for d in USER_FEATURES]
    assert len(names) == len(set(names))


def test_expanded_columns_cover_the_spec():
    observed = {"categories": ("Comedy", "Drama"), "gender": ("F", "M"), "region": ("north",)}
    cols = [name for name, _, _ in feature_columns(USER_FEATURES, observed)]
    assert len(cols) == len(set(cols))
    expected = {f"{f}_{d}d" for f in ("events", "clicks") for d in (1, 7, 30)}
    expected |= {f"mean_{f}_{d}d" for f in ("dwell", "scroll") for d in (7, 30)}
    expected |= {
        "decayed_activity",
        "decayed_clicks",
        "cat_Comedy",
        "cat_Drama",
        "events_total",
        "click_rate",
        "mean_dwell",
        "mean_scroll",
        "ratings_total",
        "mean_rating",
        "mean_implicit_confidence",
        "decayed_implicit_strength",
        "age",
        "gender_F",
        "gender_M",
        "region_north",
    }
    expected |= {f"share_{d}" for d in DEVICES} | {f"share_{t}" for t in ("morning", "afternoon", "evening", "night")}
    expected |= {"share_weekday", "share_weekend"}
    assert set(cols) == expected


def test_every_definition_states_its_spec():
    specs = {d.name: d.spec() for d in USER_FEATURES}
    for spec in specs.values():
        assert {"entity", "source", "aggregation", "window_days", "decay", "dtype"} <= set(spec)
        assert spec["entity"] == "user" and spec["dtype"] in ("int", "float") and spec["doc"]
    assert [specs[f"events_{d}d"]["window_days"] for d in (1, 7, 30)] == [1, 7, 30]
    assert specs["decayed_activity"]["decay"] == "half_life" and specs["decayed_activity"]["weighted"] == "confidence"
    assert specs["category_affinity"]["decay"] == "half_life" and specs["events_7d"]["decay"] is None
    assert specs["gender"]["source"] == "users" and specs["gender"]["columns"] == "gender_{value}"
    assert specs["mean_implicit_confidence"]["where"] == "signal == 'implicit'"


def test_family_without_values_needs_observed_values():
    with pytest.raises(ValueError, match="no values for column 'categories'"):
        feature_columns(USER_FEATURES, {})


def test_duplicate_expanded_columns_are_rejected():
    defs = (
        FeatureDef("a", "share", "device", template="x_{value}", values=("tv",)),
        FeatureDef("b", "share", "event_type", template="x_{value}", values=("tv",)),
    )
    with pytest.raises(ValueError, match="duplicate feature columns: \\['x_tv'\\]"):
        feature_columns(defs, {})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="m", aggregation="mean"), "needs a column"),
        (dict(name="s", aggregation="share", column="device"), "need a template"),
        (dict(name="c", aggregation="count", window_days=0), "window_days must be > 0"),
        (dict(name="c", aggregation="count", decayed=True, dtype="int"), "dtype 'int'"),
        (dict(name="x", aggregation="median", column="rating"), "unknown aggregation"),
        (dict(name="p", aggregation="passthrough", column="age"), "source 'users'"),
        (dict(name="o", aggregation="onehot", column="gender", source="users"), "need a template"),
        (dict(name="w", aggregation="passthrough", column="age", source="users", window_days=7), "no window"),
        (dict(name="m", aggregation="mean", column="rating", dtype="int"), "dtype 'int'"),
    ],
)
def test_invalid_definitions_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureDef(**kwargs)
