"""Queries are embedded exactly as the corpus was: the same text gives the stored vector."""

import numpy as np
import pyarrow.dataset as ds
import pytest

from pipeline import versions
from pipeline.errors import ModelError, StrataError
from pipeline.query import QueryEncoder
from pipeline.storage import Location


def stored(output, column: str, ids: list[str]) -> np.ndarray:
    table = ds.dataset(str(output / "data"), partitioning="hive").to_table(columns=["id", column])
    by_id = dict(zip(table["id"].to_pylist(), table[column].to_pylist()))
    return np.array([by_id[i] for i in ids], np.float32)


@pytest.mark.parametrize("column", ["sentence", "layers", "cls_mid"])
def test_query_vector_equals_the_stored_vector(passage_output, column):
    output, docs = passage_output
    identity = versions.read_snapshot(Location.from_uri(str(output))).identity
    long_ones = sorted(docs, key=lambda i: -len(docs[i]["text"]))[:8]  # several 64-token windows each
    ids = long_ones + list(docs)[::97]
    encoder = QueryEncoder(identity, column)
    got = encoder.encode([docs[i]["text"] for i in ids])
    expected = stored(output, column, ids)
    assert got.shape == expected.shape == (len(ids), *expected.shape[1:])
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    alone = encoder.encode([docs[ids[0]]["text"]])  # one text, no batch around it
    np.testing.assert_allclose(alone[0], expected[0], atol=2e-5, rtol=0)


def test_query_refuses_other_weights_an_unknown_or_token_level_column_and_empty_text(passage_output):
    output, _ = passage_output
    identity = versions.read_snapshot(Location.from_uri(str(output))).identity
    with pytest.raises(ModelError, match="not the one that made these vectors"):
        QueryEncoder({**identity, "model_weights_sha256": "0" * 64}, "sentence")
    with pytest.raises(StrataError, match="no vector column 'nope'; its columns: sentence, layers, cls_mid"):
        QueryEncoder(identity, "nope")
    token_level = {**identity, "outputs": [{**identity["outputs"][0], "pooling": "none"}]}
    with pytest.raises(StrataError, match="token-level"):
        QueryEncoder(token_level, "sentence")
    with pytest.raises(StrataError, match="the query is empty"):
        QueryEncoder(identity, "sentence").encode([" \n\t"])
