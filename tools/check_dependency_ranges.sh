#!/usr/bin/env bash
# Install hooked-vllm at both ends of the ranges that pyproject.toml declares and run the tests in each.
#
#   lowest:  uv pip install --resolution lowest-direct -e ".[dev]"  (each direct dependency at its floor)
#   highest: uv pip install -e ".[dev]"                             (the newest releases the ranges allow)
#
# Each end gets a fresh venv under a temp dir; the script prints the resolved versions of the direct
# dependencies and runs `python -m pytest -q`, and exits non-zero if either end fails to install or test.
#
# Usage: tools/check_dependency_ranges.sh [lowest] [highest]     (default: both, lowest first)
#
# Environment:
#   PYTHON       interpreter for the venvs (default 3.11: a version or a path; uv never downloads one)
#   WORKDIR      where the venvs and logs go (default: a new temp dir, removed at the end unless KEEP=1)
#   KEEP=1       keep WORKDIR (venvs and logs) after the run
#   PYTEST_ARGS  arguments for pytest (default: -q)
#   UV           a uv binary (default: `uv` on PATH, else pip-installed into a venv in WORKDIR)
# uv does not read pip.conf (no local indexes, no global constraint file): it resolves against PyPI
# only, so "highest" is the newest on PyPI. UV_INDEX_URL, UV_EXTRA_INDEX_URL, UV_FIND_LINKS,
# UV_CONSTRAINT and UV_CACHE_DIR are honoured as usual. Both ends download a torch with its CUDA
# wheels from PyPI (several GB each the first time; uv's cache keeps them for the next run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-3.11}
PYTEST_ARGS=${PYTEST_ARGS:--q}
ENDS=("$@")
[ ${#ENDS[@]} -eq 0 ] && ENDS=(lowest highest)
for end in "${ENDS[@]}"; do
    case $end in lowest | highest) ;; *) echo "unknown end '$end': expected lowest or highest" >&2 && exit 2 ;; esac
done

if [ -z "${WORKDIR:-}" ]; then
    WORKDIR=$(mktemp -d -t hooked-vllm-ranges.XXXXXX)
    [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORKDIR"' EXIT
fi
mkdir -p "$WORKDIR"
echo "work dir: $WORKDIR"

if [ -n "${UV:-}" ]; then :
elif command -v uv >/dev/null; then UV=$(command -v uv)
else
    python3 -m venv "$WORKDIR/uv-tool"
    "$WORKDIR/uv-tool/bin/pip" install -q uv
    UV=$WORKDIR/uv-tool/bin/uv
fi
echo "uv: $("$UV" --version)"

# The direct dependencies (with the dev extra) and their installed versions, read from pyproject.toml.
list_direct() {
    "$1" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
from importlib.metadata import version, PackageNotFoundError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    try:
        installed = version(name)
    except PackageNotFoundError:
        installed = "MISSING"
    print(f"  {name:<18} {installed:<14} (declared {req[len(name):] or 'any'})")
EOF
}

declare -A RESULT
for end in "${ENDS[@]}"; do
    venv=$WORKDIR/$end
    echo
    echo "=== $end: installing into $venv"
    rm -rf "$venv"
    "$UV" venv -q --seed --python "$PYTHON" --python-preference only-system "$venv"
    resolution=()
    [ "$end" = lowest ] && resolution=(--resolution lowest-direct)
    if ! (cd "$ROOT" && "$UV" pip install --python "$venv/bin/python" "${resolution[@]}" -e ".[dev]" \
        >"$WORKDIR/$end-install.log" 2>&1); then
        tail -n 30 "$WORKDIR/$end-install.log"
        RESULT[$end]="install failed (log: $WORKDIR/$end-install.log)"
        continue
    fi
    echo "--- $end: python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')," \
        "direct dependencies:"
    list_direct "$venv/bin/python" | tee "$WORKDIR/$end-versions.txt"
    echo "--- $end: python -m pytest $PYTEST_ARGS"
    # The venv's bin first on PATH: the tutorial tests start Jupyter kernels from it.
    # shellcheck disable=SC2086
    if (cd "$ROOT" && PATH="$venv/bin:$PATH" VIRTUAL_ENV=$venv \
        "$venv/bin/python" -m pytest $PYTEST_ARGS -p no:cacheprovider 2>&1 | tee "$WORKDIR/$end-pytest.log"
        exit "${PIPESTATUS[0]}"); then
        RESULT[$end]="passed: $(tail -n 1 "$WORKDIR/$end-pytest.log")"
    else
        RESULT[$end]="FAILED: $(tail -n 1 "$WORKDIR/$end-pytest.log")"
    fi
done

echo
echo "=== summary"
status=0
for end in "${ENDS[@]}"; do
    echo "  $end: ${RESULT[$end]}"
    [[ ${RESULT[$end]} == passed:* ]] || status=1
done
exit $status
