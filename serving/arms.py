"""The two arms of a running experiment as serving holds them: the :class:`Experiment`
descriptor and the challenger's loaded model (the champion is whatever ``CURRENT`` serves).

:class:`ActiveExperiment` computes an arm's list and the cache entry that stores it. An
experiment's cache entry is ``<teams>\\t<items JSON>\\n<body JSON>``: the first line holds the
teams string and the items in order, so a cache hit records its impression without parsing;
the body names the experiment and the arm. The impression id differs per served list, so it
is never cached: :func:`with_impression` splices it into the body as it is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import Field

from serving.experiment import CHALLENGER_ARM, INTERLEAVED, TEAM_CODES, Experiment, Impression, team_draft
from serving.recommender import RecommendationRequest, ServedModel
from serving.schemas import Recommendations


class ExperimentRecommendations(Recommendations):
    """A list served inside an experiment: which experiment and arm served it, the teams of
    an interleaved list, and the impression id to post with its events."""

    experiment: str
    arm: str = Field(description="champion | challenger | interleaved")
    challenger_version: str | None = None
    teams: str | None = Field(None, description="interleaving: A (champion) or B (challenger) per position")
    impression_id: str = Field("", description="post it with the list's events (POST /v1/events impression_id)")


@dataclass(frozen=True)
class ActiveExperiment:
    experiment: Experiment
    challenger: ServedModel

    @property
    def id(self) -> str:
        return self.experiment.id

    def arm(self, user_id: str) -> str:
        return self.experiment.arm(user_id)

    def fingerprint(self, champion: ServedModel, arm: str, digest: str) -> str:
        """The cache fingerprint of ``arm``'s lists: per arm, per experiment, per version."""
        if arm == INTERLEAVED:
            return f"{champion.version}+{self.challenger.version}:{digest}:x:{self.id}:il"
        model = self.challenger if arm == CHALLENGER_ARM else champion
        return f"{model.version}:{digest}:x:{self.id}:{arm}"

    def compute(self, champion: ServedModel, arm: str, request: RecommendationRequest, recent: list[str]) -> bytes:
        """The cache entry of ``arm``'s list for ``request`` (raises
        :class:`~serving.recommender.RequestError` as ``recommend`` does)."""
        teams: str | None = None
        if arm == INTERLEAVED:
            ranked_a = champion.recommend(request, recent)
            ranked_b = self.challenger.recommend(request, recent)
            by_id = {it.item_id: it for it in ranked_b.items}
            by_id.update({it.item_id: it for it in ranked_a.items})
            merged, teams = team_draft(
                [it.item_id for it in ranked_a.items],
                [it.item_id for it in ranked_b.items],
                request.k,
                f"{self.id}\x00{request.user_id}",
            )
            items = [by_id[item].model_copy(update={"rank": rank}) for rank, item in enumerate(merged, 1)]
            base = ranked_a.model_copy(update={"items": items})
        else:
            base = (self.challenger if arm == CHALLENGER_ARM else champion).recommend(request, recent)
        recs = ExperimentRecommendations(
            **base.model_dump(),
            experiment=self.id,
            arm=arm,
            challenger_version=self.challenger.version,
            teams=teams,
        )
        if teams is None:
            teams = TEAM_CODES.get(arm, "A") * len(recs.items)
        shown = json.dumps([it.item_id for it in recs.items], separators=(",", ":"))
        return f"{teams}\t{shown}\n".encode() + recs.model_dump_json(exclude={"impression_id"}).encode()

    def impression(
        self, entry: bytes, user_id: str, arm: str, impression_id: str, latency_ms: float
    ) -> tuple[bytes, Impression]:
        """The response body of a cache ``entry`` with ``impression_id`` spliced in, and the
        impression to record."""
        meta, _, body = entry.partition(b"\n")
        teams, _, items = meta.decode().partition("\t")
        record = Impression(impression_id, self.id, user_id, arm, items, teams, latency_ms)
        return with_impression(body, impression_id), record


def with_impression(body: bytes, impression_id: str) -> bytes:
    """``body`` (a JSON object) with the key ``impression_id`` added last."""
    return body[:-1] + b',"impression_id":"' + impression_id.encode() + b'"}'


def headers(experiment_id: str, arm: str) -> list[tuple[bytes, bytes]]:
    """The ``X-Experiment`` and ``X-Arm`` response headers (raw ASGI form)."""
    return [(b"x-experiment", experiment_id.encode()), (b"x-arm", arm.encode())]
