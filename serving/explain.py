"""Why an item was recommended.

For a user with history ``H`` (training history plus live events) and a recommended item
``i``, the link strength of a history item ``h`` is ``L[h, i]``: the served model's
item-item weight ``W[h, i]`` (the EASE anchor) when it has one, else the cosine of the two
items' vectors (neural item-tower outputs or content embeddings). Reasons, in order:

1. ``liked``: "because you liked <title of argmax_h L[h, i]>" when that maximum is > 0;
2. ``segment``: "popular in your segment" for a cold user scored by segment popularity alone;
3. ``popular``: "popular right now" for an item in the top :data:`POPULAR_SHARE` of the
   catalogue by popularity, or any item of a popularity-only list;
4. ``profile``: "matches your interests" otherwise (the model's user vector drove it).
"""

from __future__ import annotations

import numpy as np

POPULAR_SHARE = 0.05


class Explainer:
    """Reasons for one served model's recommendations (module docstring)."""

    def __init__(
        self,
        titles: np.ndarray,
        item_ids: np.ndarray,
        popularity: np.ndarray,
        weights: np.ndarray | None,
        vectors: np.ndarray | None,
    ) -> None:
        self.titles = titles
        self.item_ids = item_ids
        self.weights = weights
        self.vectors = vectors
        n = len(popularity)
        cut = max(1, int(np.ceil(POPULAR_SHARE * n)))
        self.popular = np.zeros(n, dtype=bool)
        self.popular[np.argsort(-np.asarray(popularity), kind="stable")[:cut]] = True

    def links(self, history: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        """``L[h, i]`` for ``h`` in ``history`` (rows) and ``i`` in ``items`` (columns)."""
        if len(history) == 0:
            return None
        if self.weights is not None:
            return self.weights[np.ix_(history, items)]
        if self.vectors is not None:
            return self.vectors[history] @ self.vectors[items].T
        return None

    def reasons(self, history: np.ndarray, items: np.ndarray, popularity_only: str | None) -> list[dict]:
        """One ``{"reason", "reason_kind", "because_item_id"}`` per item of ``items``.

        ``popularity_only`` is ``"segment"`` or ``"global"`` for a list ranked by popularity
        alone (a cold user without events), else None.
        """
        items = np.asarray(items, dtype=np.int64)
        history = np.asarray(history, dtype=np.int64)
        if popularity_only is not None:
            kind, text = (
                ("segment", "popular in your segment")
                if popularity_only == "segment"
                else ("popular", "popular right now")
            )
            return [{"reason": text, "reason_kind": kind, "because_item_id": None} for _ in items]
        link = self.links(history, items)
        out = []
        for col, item in enumerate(items):
            if link is not None:
                column = np.where(history == item, -np.inf, link[:, col])  # never "because you liked" itself
                best = int(np.argmax(column))
                if column[best] > 0:
                    h = history[best]
                    out.append(
                        {
                            "reason": f"because you liked {self.titles[h]}",
                            "reason_kind": "liked",
                            "because_item_id": str(self.item_ids[h]),
                        }
                    )
                    continue
            if self.popular[item]:
                out.append({"reason": "popular right now", "reason_kind": "popular", "because_item_id": None})
            else:
                out.append({"reason": "matches your interests", "reason_kind": "profile", "because_item_id": None})
        return out
