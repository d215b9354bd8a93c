#!/usr/bin/env bash
# Run the browser test (tests/browser/) with the web app served from virtual environments pinned to each host's
# Python stack: AUTOMATIC1111 1.10 (gradio 3.41.2) and Forge (gradio 4.40.0). The test itself (pytest, playwright,
# Debian's chromium) runs from the project's own .venv; only the app under test runs in the pinned environment,
# selected through SDCONCEPTS_APP_PYTHON.
#
#   tools/host_stacks.sh [setup|test|all] [a1111] [forge]      (default: all a1111 forge)
#
# The hosts use Python 3.10; this machine's CPU torch wheel is for 3.11, so the environments use python3.11
# (override with PYTHON=...). Environments live in $SDCONCEPTS_STACKS (default ~/.cache/sdconcepts/host-stacks).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PIP_DISABLE_PIP_VERSION_CHECK=1
STACKS=${SDCONCEPTS_STACKS:-$HOME/.cache/sdconcepts/host-stacks}
PYTHON=${PYTHON:-python3.11}

# The hosts' pins (A1111 1.10 requirements_versions.txt; Forge main requirements_versions.txt). A1111 does not pin
# diffusers; the newest releases (0.39 is what pip resolves here) import transformers classes that 4.30.2 lacks
# (Dinov2WithRegistersConfig), so the A1111 environment takes Forge's diffusers 0.31.0. A1111 also pins httpx 0.24.1
# and httpcore 0.15: gradio 3.41's queue posts each event to its own server through httpx, and from httpx 0.28 that
# request times out after 5 s (a generation longer than that fails with an empty "Error").
A1111_PINS=(torch==2.13.0 gradio==3.41.2 fastapi==0.94.0 transformers==4.30.2 diffusers==0.31.0 numpy==1.26.4
            Pillow==9.5.0 httpx==0.24.1 httpcore==0.15.0)
# fastapi 0.104.1 fails to start with today's pydantic (FieldInfo has no 'in_'); the environment takes pydantic 2.8.2,
# the release current when Forge moved to gradio 4.40 (August 2024).
FORGE_PINS=(torch==2.13.0 gradio==4.40.0 fastapi==0.104.1 transformers==4.46.1 diffusers==0.31.0 numpy==1.26.4
            Pillow==9.5.0 pydantic==2.8.2)

action=${1:-all}
case $action in setup|test|all) shift || true ;; *) action=all ;; esac
stacks=("$@")
[ ${#stacks[@]} -eq 0 ] && stacks=(a1111 forge)

setup() {
    local name=$1; shift
    local venv=$STACKS/$name
    # The stamp names the pins and our dependencies: an environment made for other ones is made again.
    local stamp
    stamp=$(printf '%s\n' "$@" | cat - "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.complete" 2>/dev/null)" = "$stamp" ]; then
        # A damaged environment (a package removed or broken since) is made again.
        if "$venv/bin/python" -c 'import gradio, fastapi, transformers, diffusers, torch, playwright' 2>/dev/null ||
           "$venv/bin/python" -c 'import gradio, fastapi, transformers, diffusers, torch' 2>/dev/null; then
            echo "== $name: $venv exists"
            return
        fi
        echo "== $name: $venv is damaged (its packages do not import); making it again"
    fi
    echo "== $name: creating $venv"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    # One resolver run over the host's pins and our package, so pip picks versions of the rest that fit the pins.
    "$venv/bin/pip" install -q "$@" -e "$ROOT"
    echo "$stamp" > "$venv/.complete"
}

run_test() {
    local name=$1
    local venv=$STACKS/$name
    # The environment is cached between runs, and its editable install names the checkout that made it (a CI clone
    # elsewhere, since removed): the app under test imports this checkout, first on its path.
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    local found
    found=$("$venv/bin/python" -c 'import sdconcepts, os; print(os.path.dirname(os.path.dirname(sdconcepts.__file__)))')
    if [ "$(realpath "$found")" != "$(realpath "$ROOT")" ]; then
        echo "== $name: imports sdconcepts from $found, not $ROOT" >&2
        return 1
    fi
    echo "== $name: $("$venv/bin/python" -c 'import gradio, fastapi, transformers, diffusers, numpy, PIL, sys;
print("python", sys.version.split()[0], "gradio", gradio.__version__, "fastapi", fastapi.__version__,
      "transformers", transformers.__version__, "diffusers", diffusers.__version__, "numpy", numpy.__version__,
      "Pillow", PIL.__version__)')"
    # Only what a host serves on its gradio: our tab in the hosted layout (txt2img, cards, Train). The standalone
    # page and its img2img/Inpaint tabs run on this project's own gradio only (the main browser run covers them).
    SDCONCEPTS_APP_PYTHON=$venv/bin/python SDCONCEPTS_BROWSER_OUTPUT=$ROOT/tests/browser/output/$name \
        SDCONCEPTS_BROWSER_MODES=hosted \
        "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider -m browser tests/browser \
        --ignore=tests/browser/test_img2img_tab.py
}

status=0
for name in "${stacks[@]}"; do
    case $name in
        a1111) pins=("${A1111_PINS[@]}") ;;
        forge) pins=("${FORGE_PINS[@]}") ;;
        *) echo "unknown stack: $name (a1111 or forge)" >&2; exit 2 ;;
    esac
    if [ "$action" != test ]; then setup "$name" "${pins[@]}"; fi
    if [ "$action" != setup ]; then run_test "$name" || status=1; fi
done
exit $status
