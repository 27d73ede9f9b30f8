"""Why an item was recommended: a ``liked`` / ``segment`` / ``popular`` / ``profile`` reason
per item, from the link between the user's history items and the item (the served model's
item-item weight, else the cosine of item vectors). See docs/models.md.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

POPULAR_SHARE = 0.05


class Explainer:
    """Reasons for one served model's recommendations (:meth:`reasons`)."""

    def __init__(
        self,
        titles: np.ndarray,
        item_ids: np.ndarray,
        popularity: np.ndarray,
        weights: np.ndarray | sp.csr_matrix | None,
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
        if sp.issparse(self.weights):  # rows first: a CSR row slice is cheap
            return sp.csr_matrix(self.weights)[history][:, items].toarray()
        if self.weights is not None:
            return self.weights[np.ix_(history, items)]
        if self.vectors is not None:
            return self.vectors[history] @ self.vectors[items].T
        return None

    def reasons(
        self, history: np.ndarray, items: np.ndarray, popularity_only: str | None
    ) -> list[dict[str, str | None]]:
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
        out: list[dict[str, str | None]] = []
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
