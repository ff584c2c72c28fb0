"""Which layer suits which task, measured: per-layer probes over stacked vectors. Pure functions.

    layer_scores  a logistic-regression probe per layer, scored by stratified k-fold
                  cross-validation: accuracy and macro-F1 per fold, their mean and a 95 %
                  t-interval over the folds
    anisotropy    per layer, the average cosine between random pairs of different documents:
                  near 1 means every vector points the same way, which is why raw upper layers
                  often do poorly for similarity (the BERT-flow / whitening observation)
    recommend     the layer with the best macro-F1, and the layers statistically tied with it

Inputs are numpy arrays: vectors (N, L, D) and labels (N,). No I/O here; `probe_report.py`
reads the output and writes the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Score:
    mean: float
    low: float  # the 95 % t-interval over the folds
    high: float
    folds: tuple[float, ...]


@dataclass(frozen=True)
class LayerScore:
    layer: int  # hidden-state index (0 = embeddings)
    accuracy: Score
    macro_f1: Score


def folds_of(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of a shuffled stratified k-fold split; every layer uses the same."""
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def probe_model() -> object:
    """The probe: standardized features, then multinomial logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def summarize(values: list[float]) -> Score:
    mean = float(np.mean(values))
    if len(values) < 2:
        return Score(mean, mean, mean, tuple(values))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
    return Score(mean, mean - half, mean + half, tuple(values))


def layer_scores(vectors: np.ndarray, labels: np.ndarray, layers: list[int],
                 splits: list[tuple[np.ndarray, np.ndarray]]) -> list[LayerScore]:
    """vectors (N, L, D), labels (N,): one probe per layer, trained and scored on each split."""
    scores = []
    for position, layer in enumerate(layers):
        features = vectors[:, position, :].astype(np.float32)  # (N, D)
        accuracy, macro_f1 = [], []
        for train, test in splits:
            predicted = probe_model().fit(features[train], labels[train]).predict(features[test])
            accuracy.append(float(accuracy_score(labels[test], predicted)))
            macro_f1.append(float(f1_score(labels[test], predicted, average="macro")))
        scores.append(LayerScore(layer, summarize(accuracy), summarize(macro_f1)))
    return scores


def anisotropy(vectors: np.ndarray, pairs: int = 2000, seed: int = 0) -> np.ndarray:
    """(L,) average cosine between random pairs of different documents, per layer."""
    rng = np.random.default_rng(seed)
    count = len(vectors)
    first = rng.integers(0, count, pairs)
    second = (first + rng.integers(1, count, pairs)) % count  # never the same document
    a, b = vectors[first].astype(np.float32), vectors[second].astype(np.float32)  # (P, L, D)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return cosine.mean(axis=0)


def recommend(scores: list[LayerScore]) -> tuple[int, list[int]]:
    """(the layer with the best mean macro-F1, every layer whose interval reaches the best's mean)."""
    best = max(scores, key=lambda s: (s.macro_f1.mean, -s.layer))
    tied = [s.layer for s in scores if s.macro_f1.high >= best.macro_f1.mean]
    return best.layer, tied
