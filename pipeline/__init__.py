"""strata: embeddings from any encoder layers of BERT-family models, as a resumable Ray pipeline."""

__version__ = "0.1.0"
