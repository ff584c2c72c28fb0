"""`strata probe`: read an output's stacked vectors and a kept label, probe every layer, and write
the report: probe.json (every number), probe.png (score and anisotropy per layer) and
probe.html (plot, table, recommended layer and run config in one file a browser opens from disk).

The math is in `probe.py`; this module reads the current version's files and renders.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import probe, versions
from pipeline.config import StorageConfig
from pipeline.errors import OutputError, StrataError
from pipeline.progress import count_of
from pipeline.storage import Location

MAX_DOCS = 20000  # a stratified sample of this many documents is plenty for a linear probe


def stacked_columns(identity: dict, wanted: list[str] | None) -> list[dict]:
    """The outputs with one vector per layer (combine: stack over several layers, pooled)."""
    outputs = {spec["name"]: spec for spec in identity["outputs"]}
    stacked = [spec for spec in outputs.values() if spec["combine"] == "stack" and spec["pooling"] not in
               ("none", "first_last_avg")]
    for name in wanted or []:
        if name not in outputs:
            raise StrataError(f"the output has no column {name!r}; its columns: {', '.join(outputs)}")
        if outputs[name] not in stacked:
            spec = outputs[name]
            fix = ("a pooled column (pooling cls, mean or max) with combine: stack" if spec["pooling"] in
                   ("none", "first_last_avg") else "a column with combine: stack")
            raise StrataError(f"column {name!r} holds no per-layer vectors of documents (pooling {spec['pooling']}, "
                              f"combine {spec['combine']}); probe {fix}")
    if not stacked:
        raise StrataError("the output has no per-layer vectors to probe: add an output with layers: all, "
                          "combine: stack (pooling cls, mean or max) and run again")
    return [outputs[name] for name in wanted] if wanted else stacked


def check_labels(labels: np.ndarray, label: str, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, documents per class), refused when a probe cannot learn or be cross-validated."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        which = f"one class ({str(classes[0])!r})" if len(classes) else "no values"
        raise StrataError(f"label {label!r} has {which}: a probe needs two classes or more")
    if counts.min() < folds:
        smallest = str(classes[counts.argmin()])
        fix = f"try --folds {counts.min()}" if counts.min() >= 2 else "label more documents of it, or leave it out"
        raise StrataError(f"label {label!r} has only {count_of(int(counts.min()), 'document')} of class {smallest!r}; "
                          f"{folds}-fold cross-validation needs {folds} per class ({fix})")
    return classes, counts


def sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Row indices: all of them, or a stratified sample of `limit` (each label in proportion)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == value))[:max(1, round(limit * np.mean(labels == value)))]
              for value in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def run_probe(output_uri: str, label: str | None, columns: list[str] | None = None, folds: int = 5,
              max_docs: int = MAX_DOCS, seed: int = 0, storage: StorageConfig | None = None) -> dict:
    """Every number of the report, as plain data. Without a label only anisotropy is measured."""
    location = Location.from_uri(output_uri, storage)
    snapshot = versions.read_snapshot(location)
    if snapshot is None:
        raise OutputError(f"{output_uri} holds no published version to probe (see strata status {output_uri})")
    identity = snapshot.identity
    if label is not None and label not in identity["input"]["keep_fields"]:
        kept = ", ".join(identity["input"]["keep_fields"]) or "none"
        raise StrataError(f"the output keeps no field {label!r} (kept fields: {kept}); add it to input.keep_fields "
                          "and embed again")
    specs = stacked_columns(identity, columns)
    dataset = ds.dataset([location.path(path) for path in snapshot.files], format="parquet", filesystem=location.fs)
    if label is None:
        rows, labels = np.arange(dataset.count_rows()), None
    else:
        values = dataset.to_table(columns=[label])[label]
        rows = np.flatnonzero(pc.is_valid(values).to_numpy(zero_copy_only=False))  # documents with a label
        labels = np.array([str(value) for value in values.take(pa.array(rows)).to_pylist()])
    picked = sample(np.zeros(len(rows), np.int8) if labels is None else labels, max_docs, seed)
    rows = rows[picked]
    table = dataset.take(pa.array(rows), columns=[spec["name"] for spec in specs])  # only the sample's vectors
    report = {"output": output_uri, "version": snapshot.version, "label": label, "documents": len(rows),
              "seed": seed, "columns": [], "identity": identity}
    if labels is not None:
        labels = labels[picked]
        classes, counts = check_labels(labels, label, folds)
        splits = probe.folds_of(labels, folds, seed)
        report.update(classes=classes.tolist(), class_counts=counts.tolist(), folds=folds,
                      probe="StandardScaler + LogisticRegression (scikit-learn)")
    layers_of = json.loads(versions.data_schema(location, snapshot).metadata[b"strata.layers"])
    for spec in specs:
        vectors = _stacked(table[spec["name"]])  # (N, L, D)
        result = {"column": spec["name"], "pooling": spec["pooling"], "layers": layers_of[spec["name"]],
                  "anisotropy": probe.anisotropy(vectors, seed=seed).tolist()}
        if labels is not None:
            scores = probe.layer_scores(vectors, labels, result["layers"], splits)
            best, tied = probe.recommend(scores)
            result.update(scores=[asdict(s) for s in scores], recommended_layer=best, tied_layers=tied)
        report["columns"].append(result)
    if labels is not None:
        best = max(report["columns"], key=lambda r: max(s["macro_f1"]["mean"] for s in r["scores"]))
        report["recommended"] = {"column": best["column"], "layer": best["recommended_layer"]}
    return report


def _stacked(column: pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<fixed_size_list<D>, L> → (N, L, D) float32."""
    array = column.combine_chunks()
    count, dims = array.type.list_size, array.type.value_type.list_size
    return array.flatten().flatten().to_numpy().reshape(len(array), count, dims).astype(np.float32)


def plot_png(report: dict) -> bytes:
    """Macro-F1 per layer with its 95 % interval (with a label), and anisotropy per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = report["label"] is not None
    figure, axes = plt.subplots(1, 2 if labelled else 1, figsize=(11 if labelled else 6, 4.2), squeeze=False)
    cosine_axis = axes[0][-1]
    for result in report["columns"]:
        layers = result["layers"]
        line = cosine_axis.plot(layers, result["anisotropy"], marker="o", label=result["column"])[0]
        if labelled:
            mean, low, high = (np.array([s["macro_f1"][key] for s in result["scores"]]) for key in ("mean", "low", "high"))
            axes[0][0].plot(layers, mean, marker="o", color=line.get_color(),
                            label=f"{result['column']} ({result['pooling']})")
            axes[0][0].fill_between(layers, low, high, alpha=0.2, color=line.get_color())
    if labelled:
        axes[0][0].set(title=f"probe of {report['label']!r}: macro-F1 per layer (95 % interval)",
                       xlabel="layer (0 = embeddings)", ylabel="macro-F1")
    cosine_axis.set(title="anisotropy: mean cosine of random pairs", xlabel="layer (0 = embeddings)",
                    ylabel="mean cosine")
    for axis in axes[0]:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def render_html(report: dict, png: bytes) -> str:
    """One self-contained page: the plot inline, the table, the recommendation and the run config."""
    labelled = report["label"] is not None
    best = report.get("recommended", {})
    header = ("<th>accuracy</th><th>95 % interval</th><th>macro-F1</th><th>95 % interval</th>" if labelled else "")
    rows = []
    for result in report["columns"]:
        for position, (layer, cosine) in enumerate(zip(result["layers"], result["anisotropy"])):
            chosen = (result["column"], layer) == (best.get("column"), best.get("layer"))
            scores = result["scores"][position] if labelled else None
            cells = _cell(scores["accuracy"]) + _cell(scores["macro_f1"]) if labelled else ""
            mark = ' class="best"' if chosen else ""
            rows.append(f"<tr{mark}><td>{html.escape(result['column'])}</td>"
                        f"<td>{layer}</td>{cells}<td>{cosine:.3f}</td></tr>")
    if labelled:
        classes = ", ".join(f"{html.escape(c)} ({n})" for c, n in zip(report["classes"], report["class_counts"]))
        title = f"Which layer for {html.escape(report['label'])}?"
        summary = (f"<p><strong>Recommended: layer {best['layer']} of column {html.escape(best['column'])}</strong> "
                   f"(best mean macro-F1; layers whose 95 % interval reaches it: "
                   f"{', '.join(str(layer) for layer in _tied(report))}).</p>\n"
                   f"<p>Output {html.escape(report['output'])}, version {report['version']}; "
                   f"{report['documents']:,} documents, classes {classes}; {report['folds']}-fold stratified "
                   f"cross-validation of {html.escape(report['probe'])} on each layer's vectors (the same folds for "
                   "every layer).</p>")
    else:
        title = "How anisotropic is each layer?"
        summary = (f"<p>Output {html.escape(report['output'])}, version {report['version']}; "
                   f"{report['documents']:,} documents; mean cosine of random pairs of different documents per layer "
                   "(near 1: every vector points the same way). Give a label to probe a task.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>strata probe: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} td, th {{ padding: .25rem .8rem; text-align: right; }}
th {{ border-bottom: 1px solid #999; }} td:first-child, th:first-child {{ text-align: left; }}
tr.best {{ background: #e6f4e6; font-weight: 600; }} img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1rem; overflow: auto; }}
</style></head><body>
<h1>{title}</h1>
{summary}
<img alt="scores and anisotropy per layer" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<table><thead><tr><th>column</th><th>layer</th>{header}<th>anisotropy</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<h2>Run config</h2><pre>{html.escape(json.dumps(report["identity"], indent=2))}</pre>
</body></html>
"""


def _cell(score: dict) -> str:
    return f"<td>{score['mean']:.3f}</td><td>{score['low']:.3f} – {score['high']:.3f}</td>"


def _tied(report: dict) -> list[int]:
    best = report["recommended"]
    return next(r["tied_layers"] for r in report["columns"] if r["column"] == best["column"])


def write_report(report: dict, folder: str, storage: StorageConfig | None = None) -> list[str]:
    """probe.json, probe.png and probe.html into a folder (local or object storage); their URIs."""
    location = Location.from_uri(folder, storage)
    png = plot_png(report)
    files = {"probe.json": json.dumps(report, indent=1).encode(), "probe.png": png,
             "probe.html": render_html(report, png).encode()}
    for name, data in files.items():
        location.write_bytes(data, name)
    return [location.uri(name) for name in files]
