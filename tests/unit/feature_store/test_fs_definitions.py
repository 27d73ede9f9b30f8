import pytest

from feature_store.definitions import USER_FEATURES, FeatureDef, feature_columns
from hyperrec.schemas import DEVICES


def test_definition_names_are_unique():
    names = [d.name for d in USER_FEATURES]
    assert len(names) == len(set(names))


def test_expanded_columns_cover_the_spec():
    cols = [name for name, _, _ in feature_columns(USER_FEATURES, {"categories": ("Comedy", "Drama")})]
    assert len(cols) == len(set(cols))
    expected = {"events_7d", "events_30d", "clicks_30d", "mean_dwell_30d", "mean_scroll_30d", "mean_rating",
                "decayed_activity", "cat_Comedy", "cat_Drama", "age"}
    expected |= {f"share_{d}" for d in DEVICES} | {f"share_{t}" for t in ("morning", "afternoon", "evening", "night")}
    assert set(cols) == expected


def test_family_without_values_needs_observed_values():
    with pytest.raises(ValueError, match="no values for column 'categories'"):
        feature_columns(USER_FEATURES, {})


def test_duplicate_expanded_columns_are_rejected():
    defs = (FeatureDef("a", "share", "device", template="x_{value}", values=("tv",)),
            FeatureDef("b", "share", "event_type", template="x_{value}", values=("tv",)))
    with pytest.raises(ValueError, match="duplicate feature columns: \\['x_tv'\\]"):
        feature_columns(defs, {})


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="m", aggregation="mean"), "needs a column"),
    (dict(name="s", aggregation="share", column="device"), "need a template"),
    (dict(name="c", aggregation="count", window_days=0), "window_days must be > 0"),
    (dict(name="c", aggregation="count", decayed=True, dtype="int"), "dtype 'int'"),
    (dict(name="x", aggregation="median", column="rating"), "unknown aggregation"),
])
def test_invalid_definitions_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureDef(**kwargs)
