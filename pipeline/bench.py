"""`strata bench`: strata's throughput measured side by side with the usual ways to embed a
corpus, in one process and one run, on the same texts and the same tokens:

    loop        a careful plain-transformers loop: length-sorted batches, sdpa, output_hidden_states,
                masked mean on the device, vectors to the host (bf16 on GPU, fp32 on CPU)
    st_encode   sentence-transformers `encode` (when installed; last layer only, its own pooling)
    stage       strata's embed stage (`Embedder`) on pre-tokenized fragments
    e2e         strata end to end: JSONL shards → Ray Data → committed Parquet (when Ray is installed)

Every rate is real tokens (special tokens included, padding excluded) per second, so rates are
comparable; ratios are to `loop`. The stage's and e2e's vectors are checked against the loop's
(min cosine over documents and layers). The stage runs without Ray, so a GPU machine without
Ray can still measure it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.config import ModelConfig, OutputSpec, StrataConfig
from pipeline.embedder import Embedder
from pipeline.encoder import pick_device, pick_dtype
from pipeline.errors import StrataError, one_line
from pipeline.model import ModelInfo, default_model_path, resolve_model
from pipeline.spec import DeviceOptions, EmbedSettings, Simulation, resolve_output
from pipeline.tokenize import TextTokenizer

MIN_SIMULATED_RATE = 100.0  # tokens/s: slower, a simulated run of a few thousand documents takes hours
COSINE_FLOOR = 0.999  # a method whose vectors fall below this against the loop's computes something else
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class Workload:
    """What every method computes: one output over all documents."""

    output: OutputSpec
    precision: str  # stored vector precision (the host side of every method)

    @property
    def hidden_states(self) -> bool:
        """Whether the plain loop needs output_hidden_states (anything but the last layer)."""
        return self.output.layers != [-1]


WORKLOADS = {
    # the GPU target: every hidden state mean-pooled, stacked, fp16 on the host
    "all-layers": Workload(OutputSpec(name="vector", layers="all", pooling="mean", combine="stack"), "float16"),
    # the CPU target: the classic sentence embedding, comparable with sentence-transformers
    "sentence": Workload(OutputSpec(name="vector", layers=[-1], pooling="mean", combine="concat", normalize=True),
                         "float32"),
}


@dataclass
class BenchOptions:
    corpus: str
    docs: int = 2000
    models: tuple[str, ...] = ("minilm",)  # minilm (packaged) | bert-base (random weights) | a model folder
    workload: str = "auto"  # auto = all-layers on GPU, sentence on CPU
    methods: tuple[str, ...] = ("loop", "st_encode", "stage", "e2e")
    loop_batch: int = 64
    st_batch: int = 32  # sentence-transformers' own default
    token_budget: int = 16384
    fragment_docs: int = 4096
    max_length: int | None = None  # None = the model folder's own limit
    device: str = "auto"
    profile: bool = False
    memory_scale: int = 0  # > 0: also compare peak host memory of e2e on docs and memory_scale × docs
    busy_docs: int = 2000  # documents of each simulated-device run (--device sim:RATE); 0 = host cost only
    tries: tuple[str, ...] = ()  # device options the stage also runs with, one at a time (NAME=VALUE)


@dataclass
class Measurement:
    model: str
    method: str
    tokens: int
    seconds: float
    padding_share: float | None = None
    min_cosine: float | None = None  # vs the loop's vectors
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def vectors_match(self) -> bool | None:
        """Whether the vectors equal the loop's (None: nothing to compare)."""
        return None if self.min_cosine is None else self.min_cosine >= COSINE_FLOOR


@dataclass
class Sample:
    ids: list[str]
    texts: list[str]


def load_sample(corpus: str, docs: int) -> Sample:
    """The first `docs` documents of a JSONL(.gz) corpus with `id` and `text` fields."""
    path = Path(corpus)
    if not path.is_file():
        raise StrataError(f"bench corpus {corpus} is not a file; give a .jsonl or .jsonl.gz with id and text fields")
    ids, texts = [], []
    number = 0
    try:
        with (gzip.open(path, "rt") if path.suffix == ".gz" else path.open()) as lines:
            for number, line in enumerate(lines, 1):
                if len(texts) == docs:
                    break
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "id" not in record:
                    raise StrataError(f"bench corpus {corpus}, line {number}: not a JSON object with an id and a "
                                      "string text")
                ids.append(str(record["id"]))
                texts.append(record["text"])
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise StrataError(f"bench corpus {corpus}, line {number}: {one_line(exc)}; give a .jsonl or .jsonl.gz "
                          "with id and text fields") from None
    if not texts:
        raise StrataError(f"bench corpus {corpus} holds no documents")
    return Sample(ids, texts)


def model_folder(name: str, scratch: Path, vocabulary: Path | None = None) -> Path:
    """minilm = the packaged model; bert-base = bert-base-uncased's shape with random weights
    (throughput does not depend on the weights) and the uncased vocabulary of `vocabulary`, a
    MiniLM/BERT-uncased folder (default: the packaged model)."""
    if name == "minilm":
        return default_model_path()
    if name != "bert-base":
        return Path(name).expanduser()
    vocabulary = vocabulary or default_model_path()
    folder = scratch / "bert-base-random"
    if not (folder / "config.json").is_file():
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        BertModel(BertConfig(), add_pooling_layer=False).save_pretrained(folder)
        for file in TOKENIZER_FILES:
            if (vocabulary / file).is_file():
                shutil.copy(vocabulary / file, folder / file)
    return folder


def run_bench(options: BenchOptions, report: Callable[[Measurement], None] = lambda m: None) -> dict:
    """Measure every method for every model; returns the JSON-ready result."""
    rates = simulated_rates(options.device)
    device = torch.device("cpu") if rates else bench_device(options.device)
    tries = [device_option(spec) for spec in options.tries]  # errors before anything runs
    if rates and tries:
        raise StrataError("--try runs the stage once more on a real device; it does nothing with --device sim:")
    workload_name = options.workload if options.workload != "auto" else ("all-layers" if device.type == "cuda" else "sentence")
    if rates and options.workload == "auto":  # the two feed workloads: MiniLM sentence, bert-base all layers
        workload_name = "all-layers" if options.models == ("bert-base",) else "sentence"
    workload = WORKLOADS[workload_name]
    sample = load_sample(options.corpus, options.docs * max(options.memory_scale, 1))
    if options.memory_scale and len(sample.texts) < options.docs * options.memory_scale:
        raise StrataError(f"--memory-scale {options.memory_scale} needs {options.docs * options.memory_scale} "
                          f"documents but {options.corpus} has {len(sample.texts)}; lower --docs or --memory-scale")
    larger, sample = sample, Sample(sample.ids[: options.docs], sample.texts[: options.docs])
    results: list[Measurement] = []
    extra: dict = {}
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as scratch:
        folders = [Path(m).expanduser() for m in options.models if m not in ("minilm", "bert-base")]
        for name in options.models:  # bert-base borrows the vocabulary of a folder given beside it, if any
            folder = model_folder(name, Path(scratch), folders[0] if folders else None)
            info = resolve_model(ModelConfig(name_or_path=str(folder), max_length=options.max_length or "auto"))
            tokenizer = TextTokenizer(info, info.max_length)
            started = time.perf_counter()
            windows = tokenizer.encode(sample.texts)
            tokenize_seconds = time.perf_counter() - started
            tokens = int(windows.n_tokens.sum())
            extra[name] = {"max_length": info.max_length, "num_layers": info.num_layers, "hidden": info.hidden_size,
                           "tokens": tokens, "tokenizer_tokens_per_s_one_process": tokens / tokenize_seconds}
            context = _Context(name, info, tokenizer, workload, sample, tokens, device, options, Path(scratch))
            if rates:
                from pipeline.bench_feed import bench_feed

                extra[name]["feed"] = bench_feed(context, rates)
                continue
            reference = None
            for method in [m for m in METHODS if m in options.methods]:  # loop first: the reference
                measurement, vectors = METHODS[method](context)
                if method == "loop":
                    reference = vectors
                elif vectors is not None and reference is not None:
                    measurement.min_cosine = min_cosine(vectors, reference)
                results.append(measurement)
                report(measurement)
                if method == "stage":
                    for spec, (field_name, value) in zip(options.tries, tries):
                        measurement, vectors = bench_stage(context, {field_name: value}, spec)
                        if vectors is not None and reference is not None:
                            measurement.min_cosine = min_cosine(vectors, reference)
                        results.append(measurement)
                        report(measurement)
            if options.profile:
                extra[name]["profile"] = profile_stage(context)
            if options.memory_scale and name == options.models[0]:
                extra[name]["memory"] = bench_memory(context, larger)
    loop = {r.model: r.tokens_per_s for r in results if r.method == "loop"}
    return {
        "workload": {"name": workload_name, "output": workload.output.model_dump(), "precision": workload.precision},
        "docs": len(sample.texts),
        "corpus": options.corpus,
        "environment": environment(device),
        "options": {k: v for k, v in vars(options).items() if k != "corpus"},
        "models": extra,
        "cosine_floor": COSINE_FLOOR,
        "results": [{**vars(r), "tokens_per_s": r.tokens_per_s, "vectors_match": r.vectors_match,
                     "ratio_to_loop": r.tokens_per_s / loop[r.model] if loop.get(r.model) else None} for r in results],
    }


@dataclass
class _Context:
    name: str
    info: ModelInfo
    tokenizer: TextTokenizer  # the model's, loaded once for the stage and the profile
    workload: Workload
    sample: Sample
    tokens: int
    device: torch.device
    options: BenchOptions
    scratch: Path
    dtype: torch.dtype = field(init=False)

    def __post_init__(self):
        self.dtype = pick_dtype("auto", self.device)

    @property
    def layers(self) -> tuple[int, ...]:
        return resolve_output(self.workload.output, self.info.num_layers).layers


def min_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    """Smallest cosine between matching vectors (per document, and per layer of a stack)."""
    a = vectors.astype(np.float64).reshape(-1, vectors.shape[-1])
    b = reference.astype(np.float64).reshape(-1, reference.shape[-1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-30)
    return float(cos.min())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_loop(ctx: _Context) -> tuple[Measurement, np.ndarray]:
    """(a) plain transformers, written the careful way."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(ctx.info.path)
    model = AutoModel.from_pretrained(ctx.info.path, dtype=ctx.dtype, attn_implementation="sdpa").to(ctx.device).eval()
    host_dtype = torch.float16 if ctx.workload.precision == "float16" else torch.float32
    texts, batch = ctx.sample.texts, ctx.options.loop_batch
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = [None] * len(texts)

    @torch.inference_mode()
    def embed(indices: list[int]) -> torch.Tensor:
        enc = tokenizer([texts[i] for i in indices], padding=True, truncation=True, max_length=ctx.info.max_length,
                        return_tensors="pt").to(ctx.device)
        result = model(**enc, output_hidden_states=ctx.workload.hidden_states)
        states = result.hidden_states if ctx.workload.hidden_states else (result.last_hidden_state,)
        chosen = [states[i] for i in ctx.layers] if ctx.workload.hidden_states else list(states)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = torch.stack([(h.float() * mask).sum(1) / mask.sum(1) for h in chosen], dim=1)  # (B, L, D)
        if ctx.workload.output.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.to(host_dtype).cpu()

    embed(order[:batch])  # warm-up: kernels, allocator
    _synchronize(ctx.device)
    started = time.perf_counter()
    for i in range(0, len(order), batch):
        chunk = order[i : i + batch]
        for index, vector in zip(chunk, embed(chunk)):
            out[index] = vector
    _synchronize(ctx.device)
    seconds = time.perf_counter() - started
    note = f"batch {batch}, {str(ctx.dtype).removeprefix('torch.')}"
    return Measurement(ctx.name, "loop", ctx.tokens, seconds, note=note), _squeeze(torch.stack(out).numpy(), ctx)


def bench_st_encode(ctx: _Context) -> tuple[Measurement, np.ndarray | None]:
    """(b) sentence-transformers `encode`: last layer, mean pooling, as its users call it."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return Measurement(ctx.name, "st_encode", ctx.tokens, 0.0, note="skipped: sentence-transformers not installed"), None
    model = SentenceTransformer(ctx.info.path, device=str(ctx.device), model_kwargs={"dtype": ctx.dtype})
    model.max_seq_length = ctx.info.max_length
    normalize = ctx.workload.output.normalize
    model.encode(ctx.sample.texts[: ctx.options.st_batch], batch_size=ctx.options.st_batch)  # warm-up
    started = time.perf_counter()
    vectors = model.encode(ctx.sample.texts, batch_size=ctx.options.st_batch, normalize_embeddings=normalize,
                           convert_to_numpy=True)
    seconds = time.perf_counter() - started
    comparable = ctx.workload.output.layers == [-1]  # the all-layers workload computes more than encode does
    note = f"batch {ctx.options.st_batch}" + ("" if comparable else "; last layer only (less work than the others)")
    return Measurement(ctx.name, "st_encode", ctx.tokens, seconds, note=note), vectors if comparable else None


def _settings(ctx: _Context, tried: dict | None = None) -> EmbedSettings:
    output = resolve_output(ctx.workload.output, ctx.info.num_layers)
    budget = (tried or {}).get("token_budget", ctx.options.token_budget)
    options = DeviceOptions(**{k: v for k, v in (tried or {}).items() if k != "token_budget"})
    return EmbedSettings(ctx.info, (output,), "auto", budget, ctx.workload.precision, device_options=options)


TRIES = {"pass_overhead": 0, "token_budget": 2, "attention": None, "compile": None}  # name: least number, or text


def device_option(spec: str) -> tuple[str, object]:
    """`--try NAME=VALUE`: one of TRIES (spec.DeviceOptions' switches, or the token budget)."""
    name, sep, value = spec.partition("=")
    if not sep or name not in TRIES or not value:
        raise StrataError(f"--try {spec!r}: give NAME=VALUE with NAME one of {', '.join(TRIES)} "
                          "(e.g. --try compile=reduce-overhead)")
    least = TRIES[name]
    if least is None:
        return name, value
    if not value.isdigit() or int(value) < least:
        raise StrataError(f"--try {spec!r}: {name} takes a whole number of tokens, at least {least}")
    return name, int(value)


def bench_device(device: str) -> torch.device:
    """--device auto | cpu | cuda[:N] | mps as a torch device; a StrataError for anything else or
    for a device this machine does not have."""
    if device == "auto":
        return pick_device()
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise StrataError(f"--device {device!r}: give auto, cpu, cuda (cuda:N) or sim:TOKENS_PER_S") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise StrataError(f"--device {device!r}: this machine has no CUDA device (torch {torch.__version__}); "
                          "use cpu, or sim:TOKENS_PER_S for a simulated one")
    return chosen


def simulated_rates(device: str) -> list[float] | None:
    """`sim:RATE[,RATE...]` -> the rates in tokens/s; None for a real device."""
    if not device.startswith("sim:"):
        return None
    rates = []
    for rate in device.removeprefix("sim:").split(","):
        try:
            rates.append(Simulation.parse(f"sim:{rate}").tokens_per_s)
        except ValueError:
            rates.append(0.0)
        if rates[-1] < MIN_SIMULATED_RATE:
            raise StrataError(f"--device {device!r}: rate {rate!r} is not a number of tokens/s of at least "
                              f"{MIN_SIMULATED_RATE:g} (sim:TOKENS_PER_S; several go comma-separated: "
                              "sim:20000,50000)")
    return rates


def bench_stage(ctx: _Context, tried: dict | None = None, label: str = "") -> tuple[Measurement, np.ndarray | None]:
    """(c) strata's embed stage on fragments tokenized beforehand (what one model replica does);
    `tried`: device options (`--try`) it runs with instead of the defaults."""
    method = f"stage[{label}]" if label else "stage"
    try:
        embedder = Embedder(_settings(ctx, tried), ctx.device)
        embedder.embed(ctx.tokenizer.encode(ctx.sample.texts[:64]))  # warm-up (and compilation)
    except Exception as exc:  # noqa: BLE001 - an option this machine cannot run is a result too
        return Measurement(ctx.name, method, ctx.tokens, 0.0, note=f"skipped: {one_line(exc)}"), None
    step = ctx.options.fragment_docs
    fragments = [ctx.tokenizer.encode(ctx.sample.texts[i : i + step]) for i in range(0, len(ctx.sample.texts), step)]
    clock = PassClock(embedder.encoder) if ctx.device.type == "cuda" else None
    _synchronize(ctx.device)
    started = time.perf_counter()
    results = [embedder.embed(windows) for windows in fragments]
    seconds = time.perf_counter() - started
    padded = sum(r.padded_tokens for r in results)
    vectors = np.concatenate([r.vectors["vector"] for r in results])
    note = f"token_budget {embedder.settings.token_budget}"
    if clock is not None:
        note += f"; GPU busy share {clock.busy_share():.3f} (forward passes / first to last)"
    return (Measurement(ctx.name, method, ctx.tokens, seconds, padding_share=1 - ctx.tokens / padded, note=note),
            _squeeze(vectors, ctx))


class PassClock:
    """CUDA events around every forward pass of an encoder: the device's busy share is the passes'
    time over the span from the first pass's start to the last one's end (the simulated device's
    measure, `simulated.py`, taken on a real one). Events cost no synchronization."""

    def __init__(self, encoder: torch.nn.Module):
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        forward = encoder.forward

        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out

        encoder.forward = timed

    def busy_share(self) -> float:
        torch.cuda.synchronize()
        busy = sum(start.elapsed_time(end) for start, end in self.events)
        span = self.events[0][0].elapsed_time(self.events[-1][1])
        return busy / span if span > 0 else 1.0


def bench_e2e(ctx: _Context) -> tuple[Measurement, np.ndarray | None]:
    """(d) `strata run` from JSONL shards to committed Parquet, Ray started beforehand."""
    try:
        from pipeline import ray_pipeline, runner
    except ImportError:
        return Measurement(ctx.name, "e2e", ctx.tokens, 0.0, note="skipped: ray is not installed"), None
    import pyarrow.dataset as ds
    from rich.console import Console

    root = ctx.scratch / f"e2e-{ctx.name.replace('/', '_')}"
    config = e2e_config(ctx, ctx.sample, root)
    ray_pipeline.ensure_ray()
    started = time.perf_counter()
    summary = runner.run(config, console=Console(file=io.StringIO()))
    seconds = time.perf_counter() - started
    table = ds.dataset(root / "output" / "data", format="parquet", partitioning="hive").to_table(columns=["id", "vector"])
    position = {doc_id: i for i, doc_id in enumerate(table["id"].to_pylist())}
    vectors = column_numpy(table["vector"])[[position[i] for i in ctx.sample.ids]]
    note = f"{summary['fragments']} fragments, model load and Ray actors included"
    return (Measurement(ctx.name, "e2e", summary["tokens"], seconds, padding_share=summary["padding_share"], note=note),
            _squeeze(vectors, ctx))


def e2e_config(ctx: _Context, sample: Sample, root: Path, fragment_docs: int | None = None,
               compressed: bool = False) -> StrataConfig:
    """A run over the sample written as 4 JSONL shards (gzip when `compressed`) under root/input,
    output under root/output; `fragment_docs` None = the bench's option."""
    shutil.rmtree(root, ignore_errors=True)
    write_shards(sample, root / "input", shards=4, compressed=compressed)
    return StrataConfig.model_validate({
        "input": {"uri": str(root / "input")},
        "model": {"name_or_path": ctx.info.path, "max_length": ctx.info.max_length},
        "outputs": [ctx.workload.output.model_dump()],
        "batching": {"token_budget": ctx.options.token_budget,
                     "fragment_docs": fragment_docs or ctx.options.fragment_docs},
        "output": {"uri": str(root / "output"), "precision": ctx.workload.precision},
    })


def bench_memory(ctx: _Context, larger: Sample) -> dict:
    """Peak host memory of `strata run` on the sample and on the larger sample (same fragment size)."""
    from pipeline.bench_memory import peak_memory_of_run

    runs = []
    for sample in (ctx.sample, larger):
        docs = len(sample.texts)
        root = ctx.scratch / f"memory-{docs}"
        config = e2e_config(ctx, sample, root)
        (root / "config.json").write_text(config.model_dump_json())
        started = time.perf_counter()
        peak = peak_memory_of_run(root / "config.json", root / "run.log")
        runs.append({"docs": docs, "peak_pss_bytes": peak, "seconds": time.perf_counter() - started})
        shutil.rmtree(root / "output", ignore_errors=True)
    return {"model": ctx.name, "runs": runs, "ratio": runs[1]["peak_pss_bytes"] / runs[0]["peak_pss_bytes"]}


def write_shards(sample: Sample, folder: Path, shards: int, compressed: bool = False) -> None:
    folder.mkdir(parents=True)
    per = -(-len(sample.texts) // shards)
    for s in range(shards):
        name = f"part-{s:03d}.jsonl" + (".gz" if compressed else "")
        with gzip.open(folder / name, "wt", compresslevel=6) if compressed else (folder / name).open("w") as f:
            for doc_id, text in zip(sample.ids[s * per : (s + 1) * per], sample.texts[s * per : (s + 1) * per]):
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")


def column_numpy(column) -> np.ndarray:
    """A (nested) fixed-size list column as a (rows, flattened vector) array, without Python lists."""
    values = column.combine_chunks()
    while hasattr(values, "flatten"):
        values = values.flatten()
    return values.to_numpy().reshape(len(column), -1)


def _squeeze(vectors: np.ndarray, ctx: _Context) -> np.ndarray:
    # every method's vectors as (N, L, D) float32
    return np.asarray(vectors, np.float32).reshape(len(ctx.sample.texts), -1, ctx.info.hidden_size)


METHODS = {"loop": bench_loop, "st_encode": bench_st_encode, "stage": bench_stage, "e2e": bench_e2e}


def profile_stage(ctx: _Context, docs: int = 512) -> dict:
    """Where the stage's time goes: self time per operator kind (device kernels on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    embedder = Embedder(_settings(ctx), ctx.device)
    windows = ctx.tokenizer.encode(ctx.sample.texts[:docs])
    embedder.embed(windows)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        embedder.embed(windows)
        _synchronize(ctx.device)
    on_gpu = ctx.device.type == "cuda"
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) if on_gpu else event.self_cpu_time_total
        if us > 0:
            kinds[operator_kind(event.key)] = kinds.get(operator_kind(event.key), 0.0) + us / 1e6
    total = sum(kinds.values()) or 1.0
    return {"clock": "device kernels" if on_gpu else "cpu self time", "docs": docs,
            "seconds_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "share_by_kind": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}


_KINDS = (
    ("matmul", ("gemm", "addmm", "aten::mm", "aten::bmm", "matmul", "linear", "cutlass", "sm90_", "nvjet")),
    ("attention", ("attention", "fmha", "flash", "softmax", "sdpa")),
    ("normalization", ("layer_norm", "layernorm")),
    ("activation", ("gelu",)),
    ("pooling and accumulate", ("index_add", "scatter", "sum", "amax", "reduce")),
    ("copies", ("copy", "memcpy", "to_copy", "contiguous", "cat", "pin_memory")),
)


def operator_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in _KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other elementwise and glue"


def environment(device: torch.device) -> dict:
    import transformers

    from pipeline import __version__

    info = {"strata": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info
