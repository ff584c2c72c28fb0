#!/usr/bin/env bash
# The one GPU check: everything a session lent the H200 runs, in ONE device call of at most 8
# minutes. Prepare here first (bash bench/prepare-gpu-check.sh: wheels, bf16 model, corpus into
# .gpu-check/, ~56 MiB), then call the device tool with
#     command: bash bench/gpu-check.sh      carry: [".gpu-check"]      timeout_s: 540
# and commit what comes back ($OUT/gpu-check.json, $OUT/gpu-check.log) under docs/benchmarks/,
# with the H200 table in docs/BENCHMARKS.md.
#
# Parts, each under its own time limit (seconds; the sum stays under 8 minutes with the start):
#   1. precision  tests/test_precision.py on the GPU: bf16 and fp16 against fp32, every pooling
#                 and combine, per token                                                      (60)
#   2. bench      strata bench on cuda, bert-base shape and MiniLM, docs-50k, loop vs stage vs
#                 sentence-transformers, the stage's GPU busy share, the profile, and two of the
#                 GPU-only switches side by side (--try token_budget, pass_overhead)         (240)
#   3. compile    the stage with torch.compile, alone: its compile time must not cost part 2 (60)
#   4. feed       strata bench --device sim: host CPU-s per million tokens by step on the node's
#                 16 cores (no Ray there: whole runs and busy shares are measured here)       (90)
#   5. loadcheck  a replica's load-time probes on the device in bf16 and fp32: MiniLM must keep
#                 padded micro-batches (needs_equal_lengths false) and early exit              (30)
# A dry run here: PY=.venv/bin/python DEVICE=cpu DOCS=200 SKIP_INSTALL=1 bash bench/gpu-check.sh
set -uo pipefail
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DOCS=${DOCS:-50000}
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
started=$(date +%s)
say() { echo "== gpu-check +$(( $(date +%s) - started ))s: $*"; }

if [ -z "${SKIP_INSTALL:-}" ]; then
    say "install the carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu-check/wheels/*.whl || { echo "cannot install .gpu-check/wheels: run bench/prepare-gpu-check.sh here first"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY -c 'import torch, transformers, pyarrow; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "pyarrow", pyarrow.__version__, torch.cuda.get_device_name())'

say "1. precision: bf16 and fp16 against fp32 on the GPU"
timeout 60 $PY -m pytest -q -s -p no:cacheprovider tests/test_precision.py 2>&1 | grep -E "min cosine|1 - cosine|passed|failed|Error"
echo "precision rc=$?"

say "2. bench on cuda: bert-base shape (all 13 layers, mean, stack, fp16 out) and MiniLM"
timeout 240 $PY -m pipeline.cli bench --corpus .gpu-check/docs-50k.jsonl.gz --docs "$DOCS" --device "$DEVICE" \
    --model bert-base --model minilm --method loop --method st_encode --method stage --profile \
    --try token_budget=32768 --try pass_overhead=2048 --json "$OUT/bench-cuda.json"
echo "bench rc=$?"

say "3. compile: the stage with torch.compile (bert-base shape, a fifth of the documents)"
timeout 60 $PY -m pipeline.cli bench --corpus .gpu-check/docs-50k.jsonl.gz --docs $((DOCS / 5)) --device "$DEVICE" \
    --model bert-base --method stage --try compile=default --json "$OUT/bench-compile.json"
echo "compile rc=$?"

say "4. feed: host CPU-s per million tokens on this node's cores (simulated device)"
timeout 90 $PY -m pipeline.cli bench --corpus .gpu-check/docs-50k.jsonl.gz --docs $((DOCS * 2 / 5)) --model bert-base \
    --device sim:4e6 --json "$OUT/bench-feed.json"
echo "feed rc=$?"

say "5. load-time checks on the device: MiniLM must keep padded micro-batches and early exit"
timeout 30 $PY - "$OUT" "$DEVICE" <<'EOF'
import json, pathlib, sys, torch
from pipeline.config import ModelConfig
from pipeline.encoder import Encoder, pick_dtype
from pipeline.model import resolve_model
info = resolve_model(ModelConfig())
device = torch.device(sys.argv[2])
found = {}
for dtype in ("bfloat16", "float32"):
    encoder = Encoder(info, 3, pick_dtype(dtype, device), device)
    found[dtype] = {"needs_equal_lengths": encoder.needs_equal_lengths, "early_exit": encoder.tap is not None}
print("load checks:", found)  # expected: needs_equal_lengths False and early_exit True for both
(pathlib.Path(sys.argv[1]) / "bench-loadcheck.json").write_text(json.dumps(found))
EOF
echo "loadcheck rc=$?"

say "merge into gpu-check.json"
$PY - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {name: json.loads((out / f"bench-{name}.json").read_text())
          for name in ("cuda", "compile", "feed", "loadcheck") if (out / f"bench-{name}.json").is_file()}
(out / "gpu-check.json").write_text(json.dumps(merged, indent=1))
for name in ("cuda", "compile", "feed", "loadcheck"):
    (out / f"bench-{name}.json").unlink(missing_ok=True)
print("wrote", out / "gpu-check.json", "with", ", ".join(merged) or "nothing")
EOF
say "done"
