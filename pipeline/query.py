"""Query texts to vectors made exactly as an output's stored vectors were made.

The settings come from the output version's recorded identity (model folder and its weights'
sha256, max_length, long-text strategy, the output's layers, pooling, combine, normalize and
precision), and the texts go through the pipeline's own tokenizer and `Embedder`: a query and a
document with the same text get the same vector. Layer choice makes a silent mismatch easy
(a corpus of layer-4 CLS vectors searched with last-layer means); recording and replaying the
settings is what rules it out.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import LongTextConfig, ModelConfig, OutputSpec, StorageConfig
from pipeline.errors import ModelError, StrataError
from pipeline.model import ModelInfo, resolve_model
from pipeline.sources import has_visible_text
from pipeline.spec import EmbedSettings, ResolvedOutput, resolve_output

QUERY_TOKEN_BUDGET = 16384


def output_spec(identity: dict, column: str) -> OutputSpec:
    """The configured output named `column` in a run's identity."""
    for spec in identity["outputs"]:
        if spec["name"] == column:
            return OutputSpec(**spec)
    names = ", ".join(spec["name"] for spec in identity["outputs"])
    raise StrataError(f"the output has no vector column {column!r}; its columns: {names}")


def checked_model(identity: dict, storage: StorageConfig | None = None) -> ModelInfo:
    """The model folder named in the identity, refused if its weights are not the ones recorded."""
    model = resolve_model(ModelConfig(**identity["model"]), storage)
    if model.weights_sha256 != identity["model_weights_sha256"]:
        raise ModelError(
            f"the model at {model.name!r} is not the one that made these vectors (weights sha256 "
            f"{model.weights_sha256[:12]}…, recorded {identity['model_weights_sha256'][:12]}…); "
            "put the original weights there, or embed the corpus again")
    recorded = identity.get("model_files_sha256")
    if recorded and model.files_sha256 != recorded:
        raise ModelError(
            f"the model at {model.name!r} is not the one that made these vectors: its config, tokenizer or code "
            f"files differ (sha256 {model.files_sha256[:12]}…, recorded {recorded[:12]}…); put the original files "
            "there, or embed the corpus again")
    return model


class QueryEncoder:
    """Embeds texts into one output column of a run, with that run's settings."""

    def __init__(self, identity: dict, column: str, storage: StorageConfig | None = None, device=None):
        from pipeline.embedder import Embedder
        from pipeline.tokenize import TextTokenizer

        self.model = checked_model(identity, storage)
        self.output: ResolvedOutput = resolve_output(output_spec(identity, column), self.model.num_layers)
        if self.output.token_level:
            raise StrataError(f"column {column!r} is token-level (pooling: none): it has no vector per text")
        long_text = LongTextConfig(**identity["long_text"])
        settings = EmbedSettings(self.model, (self.output,), identity["model"]["dtype"], QUERY_TOKEN_BUDGET,
                                 identity["output"]["precision"])  # windows are averaged: one vector per query
        self.tokenizer = TextTokenizer(self.model, self.model.max_length, long_text.window_stride)
        self.embedder = Embedder(settings, device)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, *vector shape) in the output's stored precision: (N, D), or (N, L, D) when stacked."""
        for text in texts:
            if not has_visible_text(text):
                raise StrataError("the query is empty: give some text to search for")
        result = self.embedder.embed(self.tokenizer.encode(texts))
        return result.vectors[self.output.name]
