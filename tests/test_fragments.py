from pipeline.fragments import Fragment, fragment_id, plan_fragments, table_from_bytes, table_to_bytes
from pipeline.sources import Shard

import pyarrow as pa


def shard(source: str) -> Shard:
    return Shard(path=f"/in/{source}", source=source, format="jsonl", compression=None, size=1)


def test_fragments_cover_every_row_once():
    plan = plan_fragments([(shard("a.jsonl"), 10), (shard("b.jsonl"), 4), (shard("empty.jsonl"), 0)], 4)
    ranges = [(f.shard.source, f.start, f.end) for f in plan]
    assert ranges == [("a.jsonl", 0, 4), ("a.jsonl", 4, 8), ("a.jsonl", 8, 10), ("b.jsonl", 0, 4)]
    assert sum(f.rows for f in plan) == 14


def test_fragment_ids_are_deterministic_unique_and_path_safe():
    first = plan_fragments([(shard("dir/../we ird/a.jsonl"), 9)], 3)
    again = plan_fragments([(shard("dir/../we ird/a.jsonl"), 9)], 3)
    assert [f.id for f in first] == [f.id for f in again]
    assert len({f.id for f in first}) == 3
    for f in first:
        assert "/" not in f.id and " " not in f.id and ".." not in f.id
    assert fragment_id("x/a.jsonl", 0, 3) != fragment_id("y/a.jsonl", 0, 3)


def test_fragment_and_tables_round_trip():
    fragment = plan_fragments([(shard("a.jsonl"), 5)], 5)[0]
    assert Fragment.from_json(fragment.to_json()) == fragment
    table = pa.table({"x": [1, 2], "ids": pa.array([[1, 2], [3]], pa.list_(pa.int32()))})
    assert table_from_bytes(table_to_bytes(table)).equals(table)
