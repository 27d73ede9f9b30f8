"""The HTTP layer of the serving app (:func:`serving.app.create_app` assembles it).

- :mod:`~serving.api.state`: the model holder (load, hot swap, why there is no model);
- :mod:`~serving.api.metrics`: the Prometheus metrics and the timing middleware;
- :mod:`~serving.api.deps`: ``Depends`` providers of the app's singletons and the admin check;
- routers: :mod:`~serving.api.recommendations` (with the cache-hit fast path),
  :mod:`~serving.api.events`, :mod:`~serving.api.admin`, :mod:`~serving.api.health`
  (probes and ``/metrics``).
"""
