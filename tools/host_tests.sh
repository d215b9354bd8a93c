#!/usr/bin/env bash
# Run the real-host tests (tests/hosts/) against the real AUTOMATIC1111 1.10.1, Forge, reForge and Forge-Classic,
# prepared offline with the host kit (prepare.sh / launch.sh / stop.sh, ../shared/hosts/README.md).
#
#   tools/host_tests.sh [prepare|test|all] [pytest args...]     (default: all)
#
#   prepare  prepare (or reuse) the hosts in the cache, install the current checkout as extensions/sdconcepts,
#            clean earlier runs' state, build (or reuse) the random-weight SD 1.5 and SD 2.1 test checkpoints
#   test     prepare, then run pytest tests/hosts (extra arguments go to pytest, e.g. -k a1111)
#   all      same as test
#
# Environment:
#   SDCONCEPTS_HOST_KIT      the kit folder (default: ../shared/hosts from the repository root, then /work/shared/hosts)
#   SDCONCEPTS_HOSTS_CACHE   where prepared hosts and the checkpoint are kept (default /var/cache/sdconcepts/hosts
#                            if writable, else ~/sdconcepts-cache/hosts; no dot-folder in the path: see below);
#                            a host is keyed by the hash of the kit (tarballs, prepare.sh, torchvision stub) and the
#                            Python used, so a new kit prepares a new tree; older trees are removed
#   PYTHON                   interpreter for the hosts' venvs (default python3.11, as prepare.sh)
#   SDCONCEPTS_PYTHON        the project's interpreter that runs pytest (default ./.venv/bin/python)
#
# Exits non-zero when a host cannot be prepared, when a test fails or is skipped, or when no test ran.
# The whole script is one { ...; exit; } block: bash parses it completely before running it, so editing this file
# while a run is going (a developer's checkout) cannot change what that run executes.
{
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T_START=$SECONDS
say() { printf '[host_tests +%ss] %s\n' $((SECONDS - T_START)) "$*"; }
die() { printf '[host_tests] ERROR: %s\n' "$*" >&2; exit 1; }

action=${1:-all}
case $action in prepare|test|all) shift || true ;; *) action=all ;; esac

KIT=${SDCONCEPTS_HOST_KIT:-}
if [[ -z $KIT ]]; then
  for candidate in "$ROOT/../shared/hosts" /work/shared/hosts; do
    [[ -f $candidate/prepare.sh ]] && { KIT=$candidate; break; }
  done
fi
[[ -n $KIT && -f $KIT/prepare.sh ]] || die "host kit not found (set SDCONCEPTS_HOST_KIT to the folder with prepare.sh)"
KIT=$(cd "$KIT" && pwd)
# The cache path must have no component starting with "." (so not ~/.cache): A1111's gradio 3.41 answers 403 to
# every /file= request under such a path, i.e. the page loads none of the host's or extensions' JavaScript.
if [[ -n ${SDCONCEPTS_HOSTS_CACHE:-} ]]; then
  CACHE=$SDCONCEPTS_HOSTS_CACHE
elif mkdir -p /var/cache/sdconcepts/hosts 2>/dev/null && [[ -w /var/cache/sdconcepts/hosts ]]; then
  CACHE=/var/cache/sdconcepts/hosts
else
  CACHE=$HOME/sdconcepts-cache/hosts
fi
PYTHON=${PYTHON:-python3.11}
export PYTHON
mkdir -p "$CACHE" || die "cannot create the cache folder $CACHE"
CACHE=$(cd "$CACHE" && pwd -P)
[[ $CACHE != */.* ]] ||
  die "the cache folder $CACHE has a hidden (dot) component; the hosts' web servers refuse files under it (set SDCONCEPTS_HOSTS_CACHE)"
# The project's interpreter (pytest, playwright, diffusers): SDCONCEPTS_PYTHON, else ./.venv (what .ci/run makes).
PROJECT_PY=${SDCONCEPTS_PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PROJECT_PY ]] || die "no project interpreter at $PROJECT_PY (set SDCONCEPTS_PYTHON)"

# One run at a time per cache: runs share the prepared trees (and their extensions/ folder).
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  say "another host_tests run holds $CACHE/.lock; waiting for it"
  flock 9
fi

# The cache key: everything of the kit that prepare.sh reads, and the interpreter version.
# A1111 and Forge share one key (both tarballs: prepare.sh reads the A1111 tarball's repositories/ for every host);
# reForge and Forge-Classic add their own tarball, so a new fork tarball re-prepares only that fork.
kit_key() {
  local own=()
  case $1 in
    reforge) own=(reforge-3b56b268.tar.xz) ;;
    classic) own=(forge-classic-1f95d717.tar.xz) ;;
  esac
  {
    (cd "$KIT" && sha256sum a1111-v1.10.1.tar.xz forge-dfdcbab6.tar.xz prepare.sh && find tvstub -type f -print0 |
      sort -z | xargs -0 sha256sum)
    "$PYTHON" -c 'import sys; print(sys.version)'
    ((${#own[@]} == 0)) || (cd "$KIT" && sha256sum "${own[@]}")
  } | sha256sum | cut -c1-16
}
# The hosts to prepare and test (SDCONCEPTS_HOSTS narrows it, e.g. "a1111 forge")
HOSTS=(${SDCONCEPTS_HOSTS:-a1111 forge reforge classic})
declare -A KEYS=()
for host in "${HOSTS[@]}"; do
  case $host in a1111|forge|reforge|classic) ;; *) die "unknown host '$host' in SDCONCEPTS_HOSTS" ;; esac
  KEYS[$host]=$(kit_key "$host") || die "cannot hash the kit in $KIT or run $PYTHON"
done

# tree_intact DEST: every path of the pristine tree is still there and the venv's torch and gradio import (a cache
# damaged by a deleted file, a full disk or a killed run is prepared again); sets DAMAGE to what is wrong.
tree_intact() {
  local dest=$1 missing
  missing=$(cd "$dest" && while IFS= read -r path; do [[ -e $path || -L $path ]] || printf '%s\n' "$path"; done \
    <"$dest/.sdconcepts-pristine")
  if [[ -n $missing ]]; then
    DAMAGE="$(wc -l <<<"$missing") paths missing, e.g. $(head -n 1 <<<"$missing")"
    return 1
  fi
  if ! "$dest/venv/bin/python" -c 'import torch, gradio' >/dev/null 2>&1; then
    DAMAGE="its venv's torch or gradio does not import"
    return 1
  fi
}

# prepare_host HOST -> prepared tree at $CACHE/HOST-${KEYS[HOST]} (reused when complete and intact)
prepare_host() {
  local host=$1 dest=$CACHE/$1-${KEYS[$1]}
  if [[ -f $dest/.sdconcepts-prepared ]] && ! tree_intact "$dest"; then
    say "$host: $dest is damaged ($DAMAGE); preparing it again"
    rm -f "$dest/.sdconcepts-prepared"
  fi
  if [[ -f $dest/.sdconcepts-prepared ]]; then
    say "$host: reusing $dest"
  else
    say "$host: preparing $dest (cold: 5-8 minutes, mostly pip)"
    rm -rf "$dest"
    local t0=$SECONDS
    # prepare.sh bakes DEST's absolute path into the venv and host-env.sh, so it prepares in place; the marker
    # file says the tree is complete.
    if ! SKIP_EXTENSION_INSTALL=1 "$KIT/prepare.sh" "$host" "$dest" >"$CACHE/$host-prepare.log" 2>&1; then
      tail -n 40 "$CACHE/$host-prepare.log" >&2
      die "$host: prepare.sh failed (log: $CACHE/$host-prepare.log)"
    fi
    # What a pristine tree holds (outside venv/): anything else found later is state of a run and is removed.
    (cd "$dest" && find . -path ./venv -prune -o -print | LC_ALL=C sort >"$dest/.sdconcepts-pristine")
    echo "prepared in $((SECONDS - t0))s on $(date -u +%FT%TZ)" >"$dest/.sdconcepts-prepared"
    say "$host: prepared in $((SECONDS - t0))s"
  fi
  # Trees of an older kit or interpreter
  local old
  for old in "$CACHE/$host"-*; do
    [[ -d $old && $old != "$dest" ]] || continue
    say "$host: removing stale $old"
    rm -rf "$old"
  done
}

# clean_host HOST: remove what earlier runs left (outputs, config.json, ui-config.json, cache.json, models, logs,
# other extensions), keeping the venv and byte-code caches; then install the committed tree of this checkout.
clean_host() {
  local host=$1 dest=$CACHE/$1-${KEYS[$1]}
  if [[ -f $dest/host.pid ]] && kill -0 "$(cat "$dest/host.pid")" 2>/dev/null; then
    say "$host: stopping a host left running by an earlier run"
    "$KIT/stop.sh" "$dest" || true
  fi
  local leftovers
  leftovers=$(cd "$dest" && find . -path ./venv -prune -o -name __pycache__ -prune -o -print | LC_ALL=C sort |
    LC_ALL=C comm -13 .sdconcepts-pristine - | { grep -v -x -F -e ./.sdconcepts-pristine -e ./.sdconcepts-prepared || true; })
  if [[ -n $leftovers ]]; then
    say "$host: removing $(wc -l <<<"$leftovers") paths left by earlier runs"
    (cd "$dest" && tr '\n' '\0' <<<"$leftovers" | xargs -0 -r rm -rf --)
  fi
  local target=$dest/extensions/sdconcepts
  rm -rf "$target"
  mkdir -p "$target"
  [[ -z $(git -C "$ROOT" status --porcelain 2>/dev/null) ]] ||
    say "note: uncommitted changes in $ROOT are not tested; the hosts get the committed HEAD"
  git -C "$ROOT" archive HEAD | tar -x -C "$target"
  say "$host: extensions/sdconcepts = $(git -C "$ROOT" rev-parse --short HEAD)"
  # The extension's install.py through the host's own installer (as prepare.sh does): the first run pip-installs
  # our requirements into the cached venv, later runs find them present.
  (cd "$dest" && source ./host-env.sh && "$dest/venv/bin/python" - "$target" <<'PY'
import sys
ext = sys.argv[1]
sys.argv = ["launch.py", "--skip-torch-cuda-test"]
from modules import launch_utils
launch_utils.run_extension_installer(ext)
PY
  ) >"$dest/install.log" 2>&1 || { tail -n 30 "$dest/install.log" >&2; die "$host: the extension's install.py failed"; }
}

for host in "${HOSTS[@]}"; do
  prepare_host "$host"
  clean_host "$host"
done

# The random test checkpoints: SD 1.5 (every host test) and SD 2.1 (the SD 2 tests on Forge's model)
declare -A CHECKPOINTS=()
for family in sd1 sd2; do
  say "checkpoint: building or reusing the random $family test file"
  t0=$SECONDS
  CKPT_LINE=$(PYTHONPATH=$ROOT "$PROJECT_PY" "$ROOT/tests/hosts/random_checkpoint.py" "$CACHE/checkpoints" "$family") ||
    die "could not build the $family test checkpoint"
  CHECKPOINTS[$family]=${CKPT_LINE%%$'\t'*}
  say "checkpoint: ${CHECKPOINTS[$family]} (${CKPT_LINE#*$'\t'}; $((SECONDS - t0))s)"
done
CHECKPOINT=${CHECKPOINTS[sd1]}
# Checkpoints of older recipes
for old in "$CACHE/checkpoints"/*/; do
  old=$(cd "$old" && pwd)
  [[ $old == "$(dirname "${CHECKPOINTS[sd1]}")" || $old == "$(dirname "${CHECKPOINTS[sd2]}")" ]] ||
    { say "removing stale $old"; rm -rf "$old"; }
done

[[ $action == prepare ]] && { say "prepared: $(for h in "${HOSTS[@]}"; do printf '%s ' "$CACHE/$h-${KEYS[$h]}"; done)"; exit 0; }

# The page tests drive Debian's chromium through playwright (as .ci/run installs it).
if [[ ! -x /usr/bin/chromium ]]; then
  say "installing Debian's chromium"
  SUDO=$([[ $(id -u) == 0 ]] || echo sudo)
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium ||
    die "chromium is missing and could not be installed"
fi

# SDCONCEPTS_<HOST>_DIR for every prepared host (the tests of a host that is not prepared are not run)
for host in "${HOSTS[@]}"; do
  export "SDCONCEPTS_${host^^}_DIR=$CACHE/$host-${KEYS[$host]}"
done
export SDCONCEPTS_HOST_KIT=$KIT
export SDCONCEPTS_HOST_CHECKPOINT=$CHECKPOINT SDCONCEPTS_HOST_CHECKPOINT_SD2=${CHECKPOINTS[sd2]}
export SDCONCEPTS_HOSTS_REQUIRED=1 SDCONCEPTS_HOSTS_CACHE=$CACHE
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
REPORT=$(mktemp "${TMPDIR:-/tmp}/host_tests.XXXXXX.xml")
trap 'rm -f "$REPORT"' EXIT
say "pytest tests/hosts"
set +e
# 9>&-: the hosts pytest starts must not inherit (and keep holding) the cache lock
"$PROJECT_PY" -m pytest -p no:cacheprovider -m hosts -rs --durations=0 --junitxml="$REPORT" tests/hosts "$@" 9>&-
rc=$?
set -e
# pytest's 5 (nothing collected) is a failure too; so is any skip (the conftest turns skips into failures; this
# also catches module-level skips at collection).
SUMMARY=$("$PROJECT_PY" - "$REPORT" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(n, skipped)
PY
) || SUMMARY="0 0"
read -r n_tests n_skipped <<<"$SUMMARY"
say "pytest exit $rc: $n_tests tests, $n_skipped skipped"
if ((rc != 0)); then exit "$rc"; fi
((n_tests > 0)) || die "no host test ran"
((n_skipped == 0)) || die "$n_skipped host tests were skipped"
say "host tests passed"
exit 0
}
