#!/usr/bin/env bash
# bench/readers.sh — which versions of the readers the README shows (pyarrow, pandas, DuckDB, LanceDB,
# FAISS) read strata's vectors right: each at its stated minimum and at a few later releases, against
# real strata outputs. docs/READERS.md has the results.
#
#   bench/readers.sh [READER ...]        READER: pyarrow pandas duckdb lancedb faiss (default: all five)
#
# 1. Makes three outputs with strata's own venv ($STRATA_VENV, default .venv, made by `make test`):
#      out-f16  configs/demo.yaml as it is (output.precision float16): fixed_size_list<halffloat, D>
#               columns, one stacked (fixed_size_list<fixed_size_list<halffloat, 384>, 7>)
#      out-f32  the same with output.precision float32
#      out-tok  configs/ner-tokens.yaml on 16 documents: list<fixed_size_list<halffloat, D>> (per token, per word)
#    and, from them, the reference: every vector as pyarrow reads it, as float32 (float16 -> float32 is exact).
# 2. Installs each reader@version in a venv of its own under $READERS_DIR/venvs: pyarrow, pandas and DuckDB
#    in plain venvs; LanceDB and FAISS, whose README examples need strata itself (`strata index` /
#    `strata search`, pipeline.query.QueryEncoder), in an overlay venv: the reader's venv first, then strata's
#    venv's site-packages (a .pth line), so strata's venv is never changed.
# 3. Reads the outputs with the README's own code, taken from README.md (bench/readers_check.py): pyarrow's
#    "Reading a version", DuckDB's SQL of the same section, pd.read_parquet(..., partitioning=None), the FAISS
#    example, `strata index` (a column, and --layer of a stacked one) + `strata search`. A reader@version
#    PASSES only if every vector comes back as numbers equal to the reference exactly, in the right shape.
#
# Prints one line per reader@version (PASS/FAIL and why), then the real minimum of each reader per kind of
# output. Every trial's full record (types seen, notes, work-arounds tried) goes to $READERS_DIR/results.jsonl.
#
# Needs: PyPI (each reader version is pip-installed; nothing else is downloaded), python3 (3.11 here),
# strata's venv, ~5 GB under $READERS_DIR (20 venvs). Takes about 10 minutes the first time on 2 CPUs (the
# outputs ~3 min, the installs most of the rest), about 2.5 minutes with the outputs and venvs kept from a
# previous run; FRESH=1 adds the time to delete the old ones (~2-3 minutes).
#
# Environment: READERS_DIR (scratch, default /tmp/strata-readers), STRATA_VENV, FRESH=1 (remake outputs and
# venvs), TRIAL_TIMEOUT (seconds per install and per check, default 600), and PYARROW_VERSIONS,
# PANDAS_VERSIONS, DUCKDB_VERSIONS, LANCEDB_VERSIONS, FAISS_VERSIONS (space-separated candidates, lowest
# first; VERSION:PIN:PIN adds pip requirements to the same venv, e.g. 2.0.3:pyarrow==16.0.0:numpy<2).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
start=$SECONDS
READERS_DIR=${READERS_DIR:-/tmp/strata-readers}
STRATA_VENV=${STRATA_VENV:-$REPO/.venv}
TRIAL_TIMEOUT=${TRIAL_TIMEOUT:-600}
PYTHON=${PYTHON:-python3}
CHECK="$REPO/bench/readers_check.py"
SPY="$STRATA_VENV/bin/python"

# stated minimums first (README "DuckDB (≥ 1.1)"; pyproject: pyarrow>=16, duckdb>=1.1, lancedb>=0.33.1,
# faiss-cpu>=1.8), then later releases up to today's newest as a control
PYARROW_VERSIONS=${PYARROW_VERSIONS:-"16.0.0 26.0.1"}
# pandas states no minimum: the oldest with Python 3.11 wheels on, each with strata's lowest pyarrow
# (pandas < 2.2.2 was built against numpy 1 and needs numpy<2)
PANDAS_VERSIONS=${PANDAS_VERSIONS:-"1.5.3:pyarrow==16.0.0:numpy<2 2.0.3:pyarrow==16.0.0:numpy<2 2.1.4:pyarrow==16.0.0:numpy<2 2.2.3:pyarrow==16.0.0 3.1.1:pyarrow==16.0.0"}
DUCKDB_VERSIONS=${DUCKDB_VERSIONS:-"1.1.0 1.1.3 1.2.2 1.3.0 2.0.1"}
LANCEDB_VERSIONS=${LANCEDB_VERSIONS:-"0.33.0 0.33.1 0.34.0 0.40.0"}
# faiss-cpu 1.8.x wheels need numpy 1 (1.8.0.post1 pins numpy<2), while strata's venv today is numpy 2 (pyarrow
# 26 and pandas 3 refuse numpy 1): 1.8.0 is also tried on a numpy 1 stack in front of strata's venv
FAISS_VERSIONS=${FAISS_VERSIONS:-"1.8.0 1.8.0:numpy<2:pyarrow==16.0.0:pandas<3 1.8.0.post1 1.9.0 1.15.1"}

READERS=("$@")
[ ${#READERS[@]} -gt 0 ] || READERS=(pyarrow pandas duckdb lancedb faiss)

[ -x "$SPY" ] || { echo "no strata venv at $STRATA_VENV (make test creates it)" >&2; exit 2; }
[ "${FRESH:-0}" = 1 ] && rm -rf "$READERS_DIR"
mkdir -p "$READERS_DIR/venvs" "$READERS_DIR/ref" "$READERS_DIR/logs"
RESULTS="$READERS_DIR/results.jsonl"
: > "$RESULTS"


# -- 1. outputs and the reference ---------------------------------------------------------------
make_output() {  # NAME CONFIG [--set ...]
  local name=$1 config=$2; shift 2
  local out="$READERS_DIR/$name"
  if [ ! -e "$out/_manifest/versions/00000001.json" ]; then
    echo "making $name ($config $*)"
    (cd "$REPO" && timeout "$TRIAL_TIMEOUT" "$STRATA_VENV/bin/strata" run "$config" --set "output.uri=$out" "$@") \
      > "$READERS_DIR/logs/run-$name.log" 2>&1 || { echo "strata run failed: $READERS_DIR/logs/run-$name.log" >&2; exit 1; }
  fi
  "$SPY" "$CHECK" reference "$out" "$READERS_DIR/ref/$name.npz"
}
mkdir -p "$READERS_DIR/corpus-tok"
head -16 "$REPO/tests/data/corpus/part-0.jsonl" > "$READERS_DIR/corpus-tok/part-0.jsonl"
make_output out-f16 configs/demo.yaml
make_output out-f32 configs/demo.yaml --set output.precision=float32
make_output out-tok configs/ner-tokens.yaml --set "input.uri=$READERS_DIR/corpus-tok/"
echo "outputs and reference ready ($((SECONDS - start)) s)"
DOC_OUTS=("$READERS_DIR/out-f16" "$READERS_DIR/out-f32")
ALL_OUTS=("${DOC_OUTS[@]}" "$READERS_DIR/out-tok")

# -- 2. and 3. one trial per reader@version ---------------------------------------------------------
package_of() { case $1 in faiss) echo faiss-cpu ;; *) echo "$1" ;; esac; }

trial() {  # READER CANDIDATE (VERSION[:PIN...])
  local reader=$1 candidate=$2
  local version=${candidate%%:*} pins="" spec
  [ "$candidate" != "$version" ] && pins=${candidate#*:}
  spec=$(printf '%s' "$reader-$candidate" | tr -c 'A-Za-z0-9._-' '_')
  local venv="$READERS_DIR/venvs/$spec" log="$READERS_DIR/logs/$spec.log"
  local -a reqs=("$(package_of "$reader")==$version")
  [ -n "$pins" ] && IFS=: read -r -a more <<< "$pins" && reqs+=("${more[@]}")
  local overlay=0 outs=("${ALL_OUTS[@]}")
  case $reader in
    lancedb|faiss) overlay=1; outs=("${DOC_OUTS[@]}") ;;  # they index pooled columns only
    duckdb) reqs+=(numpy pyarrow) ;;                       # pyarrow: the Arrow-scan work-around is tried too
    pandas) reqs+=(numpy pyarrow) ;;
    *) reqs+=(numpy) ;;
  esac
  local install=ok t0=$SECONDS
  if [ ! -e "$venv/.ok" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    if [ $overlay = 1 ]; then  # the reader's venv first, then strata's venv (and its .pth files)
      site=$("$SPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      echo "import site; site.addsitedir('$site')" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_strata_venv.pth"
    fi
    if timeout "$TRIAL_TIMEOUT" "$venv/bin/pip" install --disable-pip-version-check --no-compile -q "${reqs[@]}" > "$log" 2>&1; then
      touch "$venv/.ok"
    else
      install=$(grep -E '^ERROR' "$log" | head -1 | sed 's/ (from versions:.*//' | cut -c1-300)
      [ -n "$install" ] || install="pip exited non-zero or timed out after ${TRIAL_TIMEOUT}s (see $log)"
    fi
  fi
  local record
  if [ "$install" = ok ]; then
    record=$(cd "$REPO" && PYTHONPATH="$REPO" timeout "$TRIAL_TIMEOUT" "$venv/bin/python" "$CHECK" "$reader" \
               --ref-dir "$READERS_DIR/ref" "${outs[@]}" 2>> "$log" | tail -1) || true
    [ -n "$record" ] || record='{"ok": false, "outputs": {}, "error": "the check crashed or timed out (see '"$log"')"}'
  else
    record='{"ok": false, "outputs": {}}'
  fi
  record=$(printf '%s' "$record" | "$SPY" -c '
import json, sys
r = json.loads(sys.stdin.read())
r.update(reader=sys.argv[1], wanted=sys.argv[2], pins=sys.argv[3].replace(":", " "), install=sys.argv[4],
         seconds=int(sys.argv[5]))
print(json.dumps(r))' "$reader" "$version" "$pins" "$install" "$((SECONDS - t0))")
  printf '%s\n' "$record" >> "$RESULTS"
  printf '%s' "$record" | "$SPY" "$CHECK" line
}

for reader in "${READERS[@]}"; do
  var="$(printf '%s' "$reader" | tr a-z A-Z)_VERSIONS"
  [ -n "${!var+x}" ] || { echo "unknown reader $reader (pyarrow pandas duckdb lancedb faiss)" >&2; exit 2; }
  for candidate in ${!var}; do
    trial "$reader" "$candidate"
  done
done

"$SPY" "$CHECK" summary "$RESULTS"
echo "took $((SECONDS - start)) s; every trial's record: $RESULTS"
