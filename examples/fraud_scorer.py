"""A fraud score from a user's BEAT embedding, read through the Feast SDK as a fraud team
would: train on the embedding history, score from the online store.

    python examples/fraud_scorer.py --repo feature_repo --labels labels.csv --user u42 [--user ...]
    python examples/fraud_scorer.py -f feature_store.yaml --labels labels.csv --user u42

labels.csv holds one past decision per line, ``user_id,event_timestamp,is_fraud`` (a
chargeback, a confirmed account takeover, a cleared review...), timestamped when the
decision was made. Training asks Feast for each label's embedding *as it was at that time*
(``get_historical_features``: a point-in-time join against the history the encoders
append with ``BEAT_OFFLINE_STORE=postgres``), so no label is learnt from behaviour that
came after it. Scoring reads the user's current embedding (``get_online_features``) and
runs the logistic regression on it: one online read and a dot product.

Both read the feature service ``user_embedding_current``: the view of the current model
version. Embeddings of two model versions are not comparable, so the scorer remembers the
version it was trained on and refuses to score a row of another one (ModelVersionChanged):
after ``beat model switch``, train again on the new version's history.

Imports feast, scikit-learn, numpy and pandas (``pip install feast scikit-learn``), nothing
of beatstream's. (On the embedded sqlite online store, Feast itself loads the store class
its yaml names, stream.sqlite_vector_store, so beatstream must be installed there; Redis
needs nothing more.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from feast import FeatureService, FeatureStore
from sklearn.linear_model import LogisticRegression

SERVICE = "user_embedding_current"


class ModelVersionChanged(RuntimeError):
    """The online embedding comes from another model than the classifier was trained on."""


class FraudScorer:
    """A logistic regression on the embeddings of one model version, scoring online."""

    def __init__(self, store: FeatureStore, classifier: LogisticRegression,
                 model_version: str, service: str = SERVICE) -> None:
        self.store = store
        # Resolved once: the registry lookup is not repeated per score.
        self.service: FeatureService = store.get_feature_service(service)
        self.classifier = classifier
        self.model_version = model_version
        # predict_proba's own input checks cost more than the arithmetic (about 0.1 ms a
        # call): a score is the same logistic function of one dot product, done here.
        self._weights = classifier.coef_[0].astype(np.float64)
        self._bias = float(classifier.intercept_[0])

    @classmethod
    def train(cls, store: FeatureStore, labels: pd.DataFrame,
              service: str = SERVICE) -> FraudScorer:
        """Fit on labels (user_id, event_timestamp, is_fraud), each with the embedding that
        was current at its timestamp."""
        frame = training_frame(store, labels, service)
        classifier = LogisticRegression(max_iter=1_000, class_weight="balanced")
        classifier.fit(np.stack(frame["embedding"].to_numpy()), frame["is_fraud"].to_numpy())
        return cls(store, classifier, frame["model_version"].iloc[0], service)

    def score(self, user_id: str) -> float | None:
        """The probability that the user is a fraudster; None for a user without an
        embedding (never seen, or expired from the online store)."""
        row = self.store.get_online_features(
            features=self.service, entity_rows=[{"user_id": user_id}]
        ).to_dict()
        embedding, version = row["embedding"][0], row["model_version"][0]
        if embedding is None:
            return None
        if version != self.model_version:
            raise ModelVersionChanged(
                f"{user_id}'s embedding is of model {version}, the classifier's of "
                f"{self.model_version}: train again on {self.service.name}"
            )
        return self.probability(np.asarray(embedding, np.float64))

    def probability(self, embedding: np.ndarray) -> float:
        """The classifier's fraud probability of one embedding (predict_proba's value)."""
        return float(1 / (1 + np.exp(-(embedding @ self._weights + self._bias))))


def training_frame(store: FeatureStore, labels: pd.DataFrame, service: str) -> pd.DataFrame:
    """labels with each one's point-in-time embedding and model version; labels from before
    a user's first embedding are left out, and so are rows of any but the version most labels
    got (a view served from BEAT_MODEL_DIR holds every model it was given)."""
    frame = store.get_historical_features(
        entity_df=labels[["user_id", "event_timestamp", "is_fraud"]],
        features=store.get_feature_service(service),
    ).to_df()
    frame = frame[frame["embedding"].map(lambda e: e is not None and len(e) > 0)]
    if frame.empty:
        raise ValueError(f"no label has an embedding in {service}'s history at its time: is "
                         "the history kept (BEAT_OFFLINE_STORE=postgres) and are the labels "
                         "later than the users' first embeddings?")
    frame = frame[frame["model_version"] == frame["model_version"].mode()[0]]
    if frame["is_fraud"].nunique() < 2:
        raise ValueError("the labels with an embedding are all of one class: a classifier "
                         "needs fraud and non-fraud examples")
    return frame


def read_labels(path: Path) -> pd.DataFrame:
    labels = pd.read_csv(path, dtype={"user_id": str})
    labels["event_timestamp"] = pd.to_datetime(labels["event_timestamp"], utc=True)
    labels["is_fraud"] = labels["is_fraud"].astype(int)
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", type=Path, help="the feature repo (feature_repo/)")
    where.add_argument("-f", dest="yaml", type=Path,
                       help="a feature_store.yaml (`beat feast-config` prints the deployment's)")
    parser.add_argument("--labels", type=Path, required=True,
                        help="CSV of user_id,event_timestamp,is_fraud")
    parser.add_argument("--user", action="append", required=True, help="a user to score")
    args = parser.parse_args(argv)
    store = (FeatureStore(repo_path=str(args.repo)) if args.repo
             else FeatureStore(fs_yaml_file=args.yaml))
    scorer = FraudScorer.train(store, read_labels(args.labels))
    for user_id in args.user:
        score = scorer.score(user_id)
        print(f"{user_id}\t{'no embedding' if score is None else f'{score:.4f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
