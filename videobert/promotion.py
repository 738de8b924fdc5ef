"""Moving the `champion` alias: only when an evaluation says the new version wins.

Evaluation results live on the model version as tags `eval.<metric>` (see
pipelines/evaluate.py), so a decision needs nothing but the registry. The decision and both
scores are written back as tags on the candidate version, so the registry explains itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
CANDIDATE = "candidate"


def eval_tag(metric: str) -> str:
    return f"eval.{metric}"


@dataclass(frozen=True)
class PromotionDecision:
    """What `promote` decided for one candidate version."""

    model_name: str
    version: str
    metric: str
    candidate_score: float
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(model_name, alias).version
    except MlflowException:
        return None


def version_score(client: MlflowClient, model_name: str, version: str, metric: str) -> float | None:
    tags = client.get_model_version(model_name, version).tags
    value = tags.get(eval_tag(metric))
    return None if value is None else float(value)


def promote(client: MlflowClient, model_name: str, version: str, metric: str) -> PromotionDecision:
    """Point `champion` at `version` if it beats the current champion on `metric` (higher wins).

    A first version becomes champion. A version that was never evaluated is refused. Ties keep
    the current champion, so reruns never flip-flop. Idempotent: promoting the champion again
    changes nothing but the recorded decision.
    """
    candidate_score = version_score(client, model_name, version, metric)
    if candidate_score is None:
        raise ValueError(
            f"{model_name} version {version} has no {eval_tag(metric)} tag: run `videobert evaluate` first"
        )
    champion_version = alias_version(client, model_name, CHAMPION)
    champion_score = version_score(client, model_name, champion_version, metric) if champion_version else None
    if champion_version is None:
        promoted, reason = True, "no champion yet"
    elif champion_version == version:
        promoted, reason = True, "already champion"
    elif champion_score is None:
        promoted, reason = True, f"champion v{champion_version} has no {metric} score"
    elif candidate_score > champion_score:
        promoted, reason = True, f"{metric} {candidate_score:.4f} > champion's {champion_score:.4f}"
    else:
        promoted, reason = False, f"{metric} {candidate_score:.4f} <= champion's {champion_score:.4f}"
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    decision = PromotionDecision(
        model_name, version, metric, candidate_score, champion_version, champion_score, promoted, reason
    )
    for key, value in {
        "promotion.decision": "promoted" if promoted else "rejected",
        "promotion.reason": reason,
        "promotion.metric": metric,
        "promotion.candidate_score": f"{candidate_score:.6f}",
        "promotion.champion_version": champion_version or "",
        "promotion.champion_score": "" if champion_score is None else f"{champion_score:.6f}",
    }.items():
        client.set_model_version_tag(model_name, version, key, value)
    return decision
