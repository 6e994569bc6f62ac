"""A cheap feature-space robustness screen: the two quantities of the paper's Eq. 4.

- Eq. 4a, class separation: the mean distance between class centroids of f(x) divided by
  the mean distance of a feature to its own class centroid (larger is more robust).
- Eq. 4b, adversarial drift: the mean ||f(x_adv) - f(x)|| under L_inf PGD at budget delta,
  divided by the mean distance between class centroids, so that a model cannot look robust
  by shrinking its whole feature space (smaller is more robust).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.losses import feature_distance, pgd
from core.models import FeatureClassifier


@dataclass(frozen=True)
class FeatureScreen:
    separation: float  # mean inter-centroid distance / mean intra-class spread
    drift: float  # mean ||f(x_adv) - f(x)||, in feature units
    normalized_drift: float  # drift / mean inter-centroid distance

    def as_dict(self) -> dict[str, float]:
        return {
            "separation": self.separation,
            "drift": self.drift,
            "normalized_drift": self.normalized_drift,
        }


def class_centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(k, D) mean feature of each class present in ``labels``, in label order."""
    classes = torch.unique(labels)
    return torch.stack([features[labels == c].mean(0) for c in classes])


def class_separation(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean inter-centroid distance, mean intra-class spread) of features (N, D)."""
    centroids = class_centroids(features, labels)
    classes = torch.unique(labels)
    spread = torch.cat(
        [(features[labels == c] - centroids[i]).norm(dim=1) for i, c in enumerate(classes)]
    ).mean()
    return float(torch.pdist(centroids).mean()), float(spread)


def screen(
    model: FeatureClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    delta: float = 25.5 / 255,
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 256,
) -> FeatureScreen:
    """The Eq. 4a/4b screen of ``model`` on pixels ``x`` (N, C, H, W) in [0,1], labels (N,).

    PGD maximizes cross-entropy plus feature drift with step 2.5 * delta / steps and a
    random start, in batches of ``batch_size``.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    clean, drifts = [], []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        x_adv = pgd(
            model,
            xb,
            yb,
            epsilon=delta,
            steps=steps,
            step_size=2.5 * delta / steps,
            feature_term=True,
            generator=generator,
        )
        with torch.no_grad():
            features = model.features(xb)
            drifts.append(feature_distance(model.features(x_adv), features))
        clean.append(features)
    model.train(was_training)
    features = torch.cat(clean)
    inter, intra = class_separation(features, y)
    drift = float(torch.cat(drifts).mean())
    return FeatureScreen(separation=inter / intra, drift=drift, normalized_drift=drift / inter)
