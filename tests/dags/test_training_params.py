"""The ``recsys_training`` params the stages read by name."""

from hyperrec.orchestration import load_dags


def test_force_search_param_is_offered_and_off_by_default():
    from training.warm_start import FORCE_PARAM

    params = load_dags().dags["recsys_training"].params
    assert FORCE_PARAM in params and params[FORCE_PARAM] is False
