"""`strata probe` on a small labeled sample: the per-layer scores are scikit-learn's own on the
same vectors and folds, the report is complete, and mistakes get a clear error."""

import base64
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow.dataset as ds
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import versions
from pipeline.config import parse_config
from pipeline.errors import StrataError
from pipeline.probe import anisotropy, recommend, summarize
from pipeline.probe_report import check_labels, run_probe, sample, stacked_columns, write_report
from pipeline.runner import run

from conftest import DATA, cli

SAMPLE = DATA / "labeled" / "man-sections-250.jsonl.gz"  # 50 man-page passages of each of 5 sections


@pytest.fixture(scope="module")
def labeled_output(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "out"
    cfg = parse_config({
        "input": {"uri": str(SAMPLE), "keep_fields": ["label", "page"]}, "model": {"max_length": 64},
        "outputs": [{"name": "mean_layers", "layers": "all", "pooling": "mean", "combine": "stack"},
                    {"name": "cls_some", "layers": [2, 4, 6], "pooling": "cls", "combine": "stack"},
                    {"name": "sentence", "layers": [-1], "pooling": "mean", "combine": "concat"}],
        "output": {"uri": str(out), "precision": "float32"}})
    assert run(cfg)["docs"] == 250
    return out


def test_scores_per_layer_are_scikit_learns_on_the_same_vectors_and_folds(labeled_output):
    report = run_probe(str(labeled_output), "label", ["mean_layers", "cls_some"], folds=5, seed=0)
    table = ds.dataset(versions.files(str(labeled_output)), format="parquet").to_table()
    labels = np.array(table["label"].to_pylist())
    assert report["documents"] == 250 and report["class_counts"] == [50] * 5
    for result, column, layers in zip(report["columns"], ("mean_layers", "cls_some"), ([0, 1, 2, 3, 4, 5, 6], [2, 4, 6])):
        assert result["column"] == column and [s["layer"] for s in result["scores"]] == layers
        vectors = np.array(table[column].to_pylist(), np.float32)  # (N, L, D)
        for position, score in enumerate(result["scores"]):
            direct = cross_validate(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                                    vectors[:, position], labels, scoring=["accuracy", "f1_macro"],
                                    cv=StratifiedKFold(5, shuffle=True, random_state=0))
            np.testing.assert_allclose(score["accuracy"]["folds"], direct["test_accuracy"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(score["macro_f1"]["folds"], direct["test_f1_macro"], rtol=0, atol=1e-12)
            assert score["macro_f1"]["low"] <= score["macro_f1"]["mean"] <= score["macro_f1"]["high"]
    mean_layers = report["columns"][0]
    best = max(mean_layers["scores"], key=lambda s: s["macro_f1"]["mean"])
    assert report["recommended"] == {"column": "mean_layers", "layer": best["layer"]}
    assert best["macro_f1"]["mean"] > 0.4  # five balanced classes: chance is 0.2

    sampled = run_probe(str(labeled_output), "label", ["cls_some"], folds=3, max_docs=100, seed=1)
    assert (sampled["documents"], sampled["class_counts"]) == (100, [20] * 5)  # stratified: 20 of each


def test_pure_parts():
    interval = summarize([0.5, 0.6, 0.7])
    assert interval.mean == pytest.approx(0.6) and interval.low == pytest.approx(0.6 - 4.302653 * 0.1 / 3 ** 0.5)
    same = np.ones((50, 2, 8))
    same[:, 1] = np.random.default_rng(0).normal(size=(50, 8))
    cosines = anisotropy(same)
    assert cosines[0] == pytest.approx(1.0) and abs(cosines[1]) < 0.2
    labels = np.array(["a"] * 90 + ["b"] * 10)
    picked = sample(labels, 20, seed=1)
    assert len(picked) == 20 and (labels[picked] == "b").sum() == 2
    with pytest.raises(StrataError, match=r"label 'topic' has one class \('a'\): a probe needs two classes"):
        check_labels(np.array(["a"] * 30), "topic", 5)
    with pytest.raises(StrataError, match=r"only 3 documents of class 'b'; 5-fold cross-validation needs 5"):
        check_labels(np.array(["a"] * 30 + ["b"] * 3), "topic", 5)
    flat = {"outputs": [{"name": "v", "pooling": "mean", "combine": "concat"}]}
    with pytest.raises(StrataError, match="no per-layer vectors to probe: add an output with layers: all, "
                                          "combine: stack"):
        stacked_columns(flat, None)


def test_cli_writes_the_report_and_refuses_what_cannot_be_probed(labeled_output, tmp_path, capsys):
    code, out, err = cli(capsys, "probe", str(labeled_output), "--label", "label", "--column", "mean_layers",
                         "--report", str(tmp_path / "report"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert f"recommended: layer {report['recommended']['layer']} of column mean_layers" in err
    assert json.loads((tmp_path / "report" / "probe.json").read_text())["columns"] == report["columns"]
    png = (tmp_path / "report" / "probe.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    page = (tmp_path / "report" / "probe.html").read_text()
    assert base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)) == png
    assert f"Recommended: layer {report['recommended']['layer']} of column mean_layers" in page
    assert page.count("<tr") == 1 + 7 and '"keep_fields"' in html.unescape(page)  # header + 7 layers; run config

    code, out, err = cli(capsys, "probe", str(labeled_output), "--report", str(tmp_path / "unlabelled"))
    assert code == 0 and "strata probe: 250 documents" in out and "accuracy" not in out, err
    page = (tmp_path / "unlabelled" / "probe.html").read_text()
    assert "How anisotropic is each layer?" in page and page.count("<tr") == 1 + 7 + 3  # mean_layers, cls_some

    for args, message in (
            (["--label", "topic"], "the output keeps no field 'topic' (kept fields: label, page)"),
            (["--label", "label", "--column", "sentence"], "column 'sentence' holds no per-layer vectors"),
            (["--label", "label", "--column", "nope"], "the output has no column 'nope'")):
        code, _, err = cli(capsys, "probe", str(labeled_output), *args, "--report", str(tmp_path / "x"))
        assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_html_report_renders_in_a_headless_browser(labeled_output, tmp_path):
    import matplotlib.image

    folder = tmp_path / "report"
    write_report(run_probe(str(labeled_output), "label", ["mean_layers"]), str(folder))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                    f"--screenshot={shot}", (folder / "probe.html").as_uri()], capture_output=True, timeout=120)
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round()
    plotted = np.all(np.abs(pixels - [31, 119, 180]) < 8, axis=-1).sum()  # matplotlib's first line colour
    assert pixels.shape[:2] == (1000, 1280) and plotted > 500  # the inline plot was decoded and drawn


def test_a_token_level_column_is_refused_with_what_to_probe_instead():
    identity = {"outputs": [{"name": "words", "pooling": "none", "combine": "stack", "words": "first_last"},
                            {"name": "doc", "pooling": "mean", "combine": "stack"}]}
    assert stacked_columns(identity, None) == [identity["outputs"][1]]
    with pytest.raises(StrataError, match=r"column 'words' holds no per-layer vectors of documents \(pooling none, "
                                          r"combine stack\); probe a pooled column \(pooling cls, mean or max\)"):
        stacked_columns(identity, ["words"])
