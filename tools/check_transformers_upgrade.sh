#!/usr/bin/env bash
# Run the trainer's exact-resume tests against another transformers release, so that an upgrade
# that changes a Trainer hook the trainer relies on fails here instead of resuming inexactly.
#   sh tools/check_transformers_upgrade.sh                 # the newest release on PyPI
#   TRANSFORMERS_VERSION=5.25.0 sh tools/check_transformers_upgrade.sh
#   sh tools/check_transformers_upgrade.sh -k resume_after_a_kill   # extra pytest arguments
# The scratch venv ($VENV) holds only transformers and what it newly needs; every other package
# comes from the project's venv (a .pth file adds it after the scratch one), which stays untouched.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
VENV=${VENV:-/tmp/transformers-upgrade}
VERSION=${TRANSFORMERS_VERSION:-$("$PYTHON" -m pip index versions transformers 2>/dev/null |
  sed -n 's/^transformers (\(.*\))$/\1/p')}
[ -n "$VERSION" ] || { echo "could not read the newest transformers from PyPI" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir, not a bare path: the project's own .pth hooks (torchvision_cpu_hook) run too
  "$PYTHON" -c 'import sysconfig; print("import site; site.addsitedir(%r)"
    % sysconfig.get_paths()["purelib"])' >"$purelib/project.pth"
fi
"$VENV/bin/pip" install -q -c constraints.txt "transformers==$VERSION"
"$VENV/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'

HF_HUB_OFFLINE=1 exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_trainer_hooks.py tests/test_training_runs.py tests/test_run_hardening.py \
  tests/test_engines.py -k "resume or hook or checkpoint or damaged" "$@"
