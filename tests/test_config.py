from pathlib import Path

import pytest

from pipeline.config import apply_override, load_config, parse_config
from pipeline.errors import ConfigError

BASE = {"input": {"uri": "in/"}, "output": {"uri": "out/"}}


def config(**changes):
    raw = {**BASE, **changes}
    return parse_config(raw)


def test_defaults_follow_the_design():
    cfg = config()
    assert cfg.model.name_or_path == "default"
    assert cfg.model.max_length == "auto"
    assert cfg.batching.token_budget == 16384 and cfg.batching.fragment_docs == 4096
    assert cfg.output.precision == "float16" and cfg.output.partition_by == "source"
    assert [o.name for o in cfg.outputs] == ["embedding"]
    assert cfg.run.max_error_rate == 0.01


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({**BASE, "model": {"nmae_or_path": "x"}}, "unknown key 'model.nmae_or_path'"),
        ({"output": {"uri": "o"}}, "missing required key 'input'"),
        ({**BASE, "outputs": [{"name": "a", "layers": []}]}, "layer list is empty"),
        ({**BASE, "outputs": [{"name": "a", "layers": "-4"}]}, "is not 'all', a list of indices, or a slice"),
        ({**BASE, "outputs": [{"name": "a", "layers": [1, 1]}]}, "names a layer twice"),
        ({**BASE, "outputs": [{"name": "a", "layers": [1, 2], "combine": "weighted", "weights": [1.0]}]},
         "weights has 1 numbers but layers selects 2"),
        ({**BASE, "outputs": [{"name": "a", "combine": "weighted"}]}, "needs weights"),
        ({**BASE, "outputs": [{"name": "a"}, {"name": "a"}]}, "share a name"),
        ({**BASE, "outputs": [{"name": "id"}]}, "column strata writes itself"),
        ({**BASE, "outputs": [{"name": "bad name"}]}, "not a valid column name"),
        ({**BASE, "outputs": []}, "outputs"),
        ({**BASE, "output": {"uri": "o", "partition_by": "lang"}}, "must be 'source', 'none' or one of"),
        ({**BASE, "batching": {"token_budget": 0}}, "batching.token_budget"),
        ({**BASE, "model": {"dtype": "int8"}}, "model.dtype"),
        ({**BASE, "outputs": [{"name": "a", "words": "first"}]}, "words: first makes word vectors, which needs pooling: none"),
        ({**BASE, "outputs": [{"name": "a", "pooling": "none"}, {"name": "a_offsets"}]}, "'a_offsets' would be written twice"),
        ({**BASE, "long_text": {"aggregate": "none"}}, "aggregate: none (one row per window) needs strategy: sliding_window"),
        ({**BASE, "long_text": {"strategy": "sliding_window", "stride": 0}}, "long_text.stride"),
        ({**BASE, "outputs": [{"name": "a", "pooling": "sum"}]}, "outputs.0.pooling"),
    ],
)
def test_invalid_configs_name_the_problem(raw, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_parse_yaml_values_and_index_lists(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {uri: a}\noutput: {uri: b}\noutputs: [{name: x, layers: all}]\n")
    cfg = load_config(path, ["output.uri=elsewhere", "batching.token_budget=512", "outputs.0.layers=[-1, -2]"])
    assert cfg.output.uri == "elsewhere"
    assert cfg.batching.token_budget == 512
    assert cfg.outputs[0].layers == [-1, -2]


def test_bad_overrides_are_config_errors():
    raw = {"outputs": [{"name": "x"}]}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override(raw, "no-equals-sign")
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(raw, "outputs.3.name=y")


def test_unreadable_or_non_yaml_config(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_fingerprint_tracks_vector_settings_only():
    base = config().fingerprint()
    assert config(compute={"replicas": 4}).fingerprint() == base
    assert config(batching={"token_budget": 1024}).fingerprint() == base
    assert config(batching={"fragment_docs": 100}).fingerprint() != base  # other fragments, other files
    assert config(output={"uri": "elsewhere/"}).fingerprint() == base
    assert config(outputs=[{"name": "embedding", "layers": [-2]}]).fingerprint() != base
    assert config(output={"uri": "out/", "precision": "float32"}).fingerprint() != base
    assert config(long_text={"stride": 64}).fingerprint() == base  # unused while truncating
    windows = config(long_text={"strategy": "sliding_window", "stride": 64}).fingerprint()
    assert windows != base and config(long_text={"strategy": "sliding_window", "stride": 32}).fingerprint() != windows


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_for_the_default_model(path):
    from pipeline.runner import resolve

    config = load_config(path)
    model, outputs = resolve(config)
    assert [o.name for o in outputs] == [o.name for o in config.outputs]
