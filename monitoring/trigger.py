"""Retraining policy: turns a drift check into a retrain decision."""

from __future__ import annotations

from monitoring.drift import DriftResult


def should_retrain(result: DriftResult) -> bool:
    """Whether drift warrants a retrain of ``recsys_training``.

    Current rule: retrain exactly when the drift check is drifted, i.e. the
    share of KS-drifted feature columns reached the configured ``drift_share``.
    Kept as its own function so further rules (cool-down, performance drops)
    can be added in one place.
    """
    return bool(result.drifted)
