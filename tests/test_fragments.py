from pipeline.fragments import Fragment, cut, fragment_id, table_from_bytes, table_to_bytes
from pipeline.sources import Shard

import pyarrow as pa


def shard(source: str) -> Shard:
    return Shard(path=f"/in/{source}", source=source, format="jsonl", compression=None, size=1)


def test_fragment_ids_are_deterministic_unique_and_path_safe():
    first = [cut(shard("dir/../we ird/a.jsonl"), start, start + 3, start == 6) for start in (0, 3, 6)]
    again = [cut(shard("dir/../we ird/a.jsonl"), start, start + 3, start == 6) for start in (0, 3, 6)]
    assert [f.id for f in first] == [f.id for f in again]
    assert len({f.id for f in first}) == 3
    for f in first:
        assert "/" not in f.id and " " not in f.id and ".." not in f.id
    assert fragment_id("x/a.jsonl", 0, 3) != fragment_id("y/a.jsonl", 0, 3)
    edited = Shard(path="/in/a.jsonl", source="a.jsonl", format="jsonl", compression=None, size=1, version="2:x")
    assert cut(edited, 0, 3, False).id != cut(shard("a.jsonl"), 0, 3, False).id  # an edited shard: new ids
    assert cut(shard("a.jsonl"), 0, 3, False, "v1").id != cut(shard("a.jsonl"), 0, 3, False, "v2").id


def test_fragment_and_tables_round_trip():
    fragment = cut(shard("a.jsonl"), 0, 5, True)
    assert Fragment.from_json(fragment.to_json()) == fragment
    table = pa.table({"x": [1, 2], "ids": pa.array([[1, 2], [3]], pa.list_(pa.int32()))})
    assert table_from_bytes(table_to_bytes(table)).equals(table)
