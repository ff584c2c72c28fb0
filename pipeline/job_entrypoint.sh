# strata's Ray job entrypoint (sh): run `strata run strata-job.yaml` with a Python that has strata.
#
# First the Python of the Ray worker that starts this job (the job supervisor): the cluster's
# workers run strata's steps in it, so it has strata wherever the cluster can run strata at all,
# even when the head was started as /path/to/venv/bin/ray without the venv on PATH. Ray does not
# say which Python that is; the supervisor's memory map does (…/lib/pythonX.Y/site-packages/ray/
# _raylet.so, Linux). Then `python` and `python3` on PATH. Else one line saying what to do.
pid=$$
prefix=
for _ in 1 2 3; do
    pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
    [ -n "$pid" ] && [ "$pid" -gt 1 ] || break
    prefix=$(sed -n 's#^.* \(/.*\)/lib/python[0-9.]*/[a-z]*-packages/ray/_raylet\.so$#\1#p' "/proc/$pid/maps" 2>/dev/null | head -n 1)
    [ -n "$prefix" ] && break
done
tried=
for python in ${prefix:+"$prefix/bin/python" "$prefix/bin/python3"} python python3; do
    command -v "$python" >/dev/null 2>&1 || continue
    if "$python" -c "import pipeline.cli" 2>/dev/null; then
        exec "$python" -m pipeline.cli run strata-job.yaml
    fi
    tried="$tried $(command -v "$python")"
done
echo "error: no Python on the Ray head can import strata (tried:${tried:- none found}): start the head from strata's environment (activate its venv before ray start, or put its bin folder first on PATH), or submit with --ship-code to nodes whose Python has strata's dependencies" >&2
exit 1
