"""Is a description inside the library's domain? A distance with a calibrated meaning, for the confidence gate.

Cosine to the nearest expert description ("coverage") was the old signal, and it is blind to what matters: every
"a photo of a <x>" shares the template's direction, so "a photo of a dog" was as close to the library as its own
tasks were. Here the domain is the cloud of *all the ways* the seen tasks were described (their build-side
phrasings, offline/phrasing.py), and a description's distance to it is the Mahalanobis distance

    δ(d) = ‖W (d − m)‖ / √e,     m the mean and W = Σ_s^{-1/2} of the in-domain phrasing embeddings,

Σ_s shrunk towards its mean eigenvalue (app/ml/transfer_router.whitener); or, per task, the distance to the
nearest seen task's centre under the within-task covariance (fit_domain's `groups`). Which of the two, by the
same calibration as the threshold. Directions along which in-domain wording
and content vary are scaled down; directions no in-domain description uses — where an unknown word or another
domain pushes an embedding — are scaled up.

The threshold is calibrated offline (offline/validate.py) on leave-one-task-out folds of the seen tasks (δ of a
held-out task's phrasings under a model fitted without it: how a new in-domain task looks) against synthetic
out-of-domain descriptions, never on unseen tasks or held-out phrasings.

Pure numpy: the service and offline/ both import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.ml.transfer_router import whitener


@dataclass(eq=False)
class DomainModel:
    centres: np.ndarray  # [C, e]: one centre m (the whole cloud), or one per seen task (its wordings' mean)
    whiten: np.ndarray  # [e, e] W

    def distance(self, embeddings_ne: np.ndarray) -> np.ndarray:
        """δ [N] of rows [N, e] (or one [e] embedding -> [1]): to the nearest centre."""
        x = np.asarray(embeddings_ne, np.float64).reshape(-1, self.centres.shape[1])
        diff_nce = (x[:, None, :] - self.centres[None]) @ self.whiten.T
        return np.linalg.norm(diff_nce, axis=2).min(axis=1) / np.sqrt(self.centres.shape[1])

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {"centres": self.centres, "whiten": self.whiten}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> DomainModel:
        return cls(np.asarray(tensors["centres"], np.float64), np.asarray(tensors["whiten"], np.float64))


def fit_domain(embeddings_ne: np.ndarray, shrinkage: float = 0.1, groups: np.ndarray | None = None) -> DomainModel:
    """The domain of in-domain description embeddings [N, e] (every wording of every seen task).

    Without `groups`: one cloud (mean and total covariance). With `groups` (the task of each row): one centre per
    task and the within-task covariance — a description must be worded like *some* seen task's wordings, up to how
    wording moves them; a new colour-shape combination sits between centres, and the threshold's calibration on
    held-out seen tasks says how far that is."""
    if len(embeddings_ne) < 2:
        raise ValueError("a domain needs at least two in-domain descriptions")
    x = np.asarray(embeddings_ne, np.float64)
    mean, whiten = whitener(x, shrinkage, groups)
    if groups is None:
        return DomainModel(mean[None], whiten)
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    centres = np.stack([x[group_of == g].mean(axis=0) for g in range(group_of.max() + 1)])
    return DomainModel(centres, whiten)
