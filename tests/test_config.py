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
        ({"input": {"uri": "in/", "words_field": "w", "keep_fields": ["a_missing"]}, "output": {"uri": "o"},
          "outputs": [{"name": "a", "pooling": "none", "words": "last"}]}, "'a_missing' would be written twice"),
        ({"input": {"uri": "in/", "words_field": "w"}, "output": {"uri": "o"},
          "long_text": {"strategy": "sliding_window", "stride": 8, "aggregate": "none"}},
         "input.words_field gives each document one vector per given word"),
        ({**BASE, "outputs": [{"name": "a", "pooling": "none", "words": "first_middle"}]}, "outputs.0.words"),
    ],
)
def test_invalid_configs_name_the_problem(raw, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_given_words_may_be_kept_and_make_the_text_field_free():
    cfg = config(input={"uri": "in/", "words_field": "tokens", "text_field": "sentence",
                        "keep_fields": ["tokens", "sentence", "tags"]})
    assert cfg.input.words_field == "tokens" and cfg.input.keep_fields == ["tokens", "sentence", "tags"]
    with pytest.raises(ConfigError, match="strata's own text column"):
        config(input={"uri": "in/", "words_field": "tokens", "keep_fields": ["text"]})


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


# Hostile input: each kind ends in one ConfigError line, fast, never a traceback.

ALIAS_BOMB = "\n".join(["storage:", "  options:", "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                       + [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)])


def write(path: Path, body: str | bytes, base: bool = True) -> Path:
    head = b"input: {uri: in/}\noutput: {uri: out/}\n" if base else b""
    path.write_bytes(head + (body.encode() if isinstance(body, str) else body))
    return path


def assert_config_error(path, overrides=None, *, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_config_bytes_that_are_not_utf8_yaml_text(tmp_path: Path):
    latin1 = write(tmp_path / "latin1.yaml", "# résumé\n".encode("latin-1"))
    assert_config_error(latin1, match=r"latin1.yaml is not UTF-8 text: byte 0xe9 at line 3, column 4")
    assert_config_error(write(tmp_path / "nul.yaml", b"x: a\0b\n"), match="not valid YAML: unacceptable character")
    assert_config_error(write(tmp_path / "tag.yaml", "x: !!python/object:os.system {}\n"),
                        match=r"not valid YAML: could not determine a constructor .* \(line 3")
    assert_config_error(write(tmp_path / "date.yaml", "model: {name_or_path: 2024-13-01}\n"),
                        match="cannot read '2024-13-01' as timestamp: month must be in 1..12")
    assert_config_error(write(tmp_path / "bool.yaml", "model: {name_or_path: !!bool maybe}\n"),
                        match="cannot read 'maybe' as bool")


def test_config_files_are_read_bounded(tmp_path: Path):
    assert_config_error("/dev/zero", match="is over 1,000,000 bytes")
    assert_config_error(write(tmp_path / "big.yaml", "#" + "x" * 1_000_000 + "\n"), match="is over 1,000,000 bytes")
    assert_config_error(tmp_path, match="cannot read config .*: Is a directory")


@pytest.mark.parametrize("body", ["[" * 50_000 + "]" * 50_000, "{a: " * 50_000 + "1" + "}" * 50_000, "[" * 40])
def test_deep_nesting_is_refused_before_recursion(tmp_path: Path, body: str):
    assert_config_error(write(tmp_path / "deep.yaml", f"model: {body}\n"), match="nested more than 32 levels deep")
    assert_config_error(write(tmp_path / "c.yaml", ""), [f"model={body}"],
                        match="--set 'model': nested more than 32 levels deep")


def test_deep_aliases_and_merge_chains_are_refused(tmp_path: Path):
    chain = "m0: &m0 {k0: 1}\n" + "".join(f"m{i}: &m{i} {{<<: *m{i - 1}, k{i}: 1}}\n" for i in range(1, 1500))
    assert_config_error(write(tmp_path / "merge.yaml", chain + "<<: *m1499\n"),
                        match="nested more than 32 levels deep, YAML aliases included")
    assert_config_error(write(tmp_path / "cycle.yaml", "storage: {options: {x: &a [*a]}}\n"),
                        match="nested more than 32 levels deep")


def test_alias_bombs_are_refused_and_small_aliases_still_work(tmp_path: Path):
    bomb = write(tmp_path / "bomb.yaml", ALIAS_BOMB + "\n")
    assert len(bomb.read_bytes()) < 1_000
    assert_config_error(bomb, match="more than 10,000 values once YAML aliases are expanded .*storage.options.l9")
    flow = "[" + ", ".join(line.split(": ", 1)[1] for line in ALIAS_BOMB.splitlines()[2:]) + "]"
    assert_config_error(write(tmp_path / "c.yaml", ""), [f"storage.options.x={flow}"],
                        match="--set 'storage.options.x': more than 10,000 values")
    assert_config_error(write(tmp_path / "wide.yaml", "x: [" + ", ".join(["1"] * 20_000) + "]\n"),
                        match="more than 10,000 values")
    shared = write(tmp_path / "shared.yaml", "outputs:\n- &spec {name: a, pooling: max}\n- {<<: *spec, name: b}\n")
    assert [(o.name, o.pooling) for o in load_config(shared).outputs] == [("a", "max"), ("b", "max")]


def test_storage_options_are_scalars_with_one_level_of_mapping(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "storage:\n  options:\n    use_ssl: false\n    default_block_size: 1048576\n"
                                      "    s3_additional_kwargs: {ServerSideEncryption: AES256}\n")
    assert load_config(path).storage.options["s3_additional_kwargs"] == {"ServerSideEncryption": "AES256"}
    for override, where in [("storage.options.x=[1, 2]", "'x' is a list"),
                            ("storage.options.x=[[1]]", "'x' is a list"),
                            ("storage.options.config_kwargs={retries: {max_attempts: 3}}",
                             "'config_kwargs.retries' is a dict"),
                            ("storage.options.x={a: [1]}", "'x.a' is a list")]:
        assert_config_error(path, [override], match=f"storage.options: {where}; an option is a string, number")


def test_keys_must_be_names(tmp_path: Path):
    assert_config_error(write(tmp_path / "int.yaml", "1: x\n"),
                        match="the key '1' at line 3 is read as int, not a name")
    assert_config_error(write(tmp_path / "bool.yaml", "model: {name_or_path: a, on: x}\n"),
                        match="the key 'on' at line 3 is read as bool")
    assert_config_error(write(tmp_path / "seq.yaml", "? [a]\n: b\n"), match="the key a sequence at line 3")


def test_values_that_would_break_downstream_code(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "")
    assert_config_error(write(tmp_path / "huge.yaml", "batching: {fragment_docs: " + "9" * 5000 + "}\n"),
                        match="cannot read '9999.*' as int")
    assert_config_error(path, ["batching.fragment_docs=" + "9" * 30],
                        match="fragment_docs: a 100-bit number is out of range")
    assert_config_error(path, ["storage.connect_timeout=inf"], match="connect_timeout: inf is not a finite number")
    assert_config_error(path, ["storage.options.x=.nan"], match="'x': nan is not a finite number")
    assert_config_error(write(tmp_path / "nul.yaml", 'model: {name_or_path: "a\\0b"}\n'),
                        match="name_or_path: 'a\\\\x00b' contains a NUL character")


def test_override_key_paths_are_bounded(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "outputs: [{name: x}]\n")
    assert_config_error(path, [".".join(["a"] * 50_000) + "=1"], match="a key path is up to 32 names")
    assert_config_error(path, ["outputs..name=1"], match="a key path is up to 32 names")
    assert_config_error(path, ["outputs." + "9" * 5000 + ".name=y"], match="is not an index of the 1-item list")
    assert_config_error(path, ["outputs.²=y"], match="'²' is not an index of the 1-item list")


@pytest.mark.parametrize("keep, text_field", [(["text"], "text"), (["body"], "body"), (["text"], "body")])
def test_the_text_field_is_not_a_keep_field(keep, text_field):
    with pytest.raises(ConfigError, match=r"keep_fields: '(text|body)' is"):
        parse_config({"input": {"uri": "x", "keep_fields": keep, "text_field": text_field}, "output": {"uri": "y"}})


def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {uri: a}\noutput: {uri: b}\noutput: {uri: c}\n")
    with pytest.raises(ConfigError, match=r"the key 'output' appears twice"):
        load_config(path)
