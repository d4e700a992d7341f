#!/usr/bin/env bash
# build-istiod.sh builds Istio's control plane (pilot-discovery, "istiod") from
# its published Go module into the tools cache, for the tests that run warren
# under a real istiod (tests/e2e/istiod_test.go):
#   ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}/istiod-$ISTIO_VERSION/
#       pilot-discovery  crd-all.gen.yaml
# crd-all.gen.yaml is Istio's CRD bundle from the same module
# (manifests/charts/base/files), applied to the test kube-apiserver.
#
# The build happens in a throwaway module that imports
# istio.io/istio/pilot/cmd/pilot-discovery, so nothing of it reaches warren's
# go.mod. The pins below are versions this machine's filtering module proxy
# serves (see ../shared/TOOLING.md, "Real istiod").
# Cold: 1,310 s (22 min) on the 2-core lab machine shared with other builds.
# Idempotent: does nothing when the binary is already there.
set -euo pipefail

ISTIO_VERSION="${ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}"
ISTIO_API_VERSION="${ISTIO_API_VERSION:-v1.31.1}"
GCP_ENVOY_VERSION="${GCP_ENVOY_VERSION:-v1.40.0}"
GCP_CONTRIB_VERSION="${GCP_CONTRIB_VERSION:-v1.36.1-0.20260729145720-a2d8c7492908}"
TOOLS="${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}"
DEST="$TOOLS/istiod-$ISTIO_VERSION"
GO="${GO:-go}"

if [[ -x "$DEST/pilot-discovery" && -s "$DEST/crd-all.gen.yaml" ]]; then
	echo "build-istiod: istiod $ISTIO_VERSION already in $DEST"
	exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/warren-istiod-build.XXXXXX")"
trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/mod" "$work/out"
start=$SECONDS
export GOWORK=off GOFLAGS=-mod=mod

cd "$work/mod"
cat >go.mod <<MOD
module warren.local/istiod-build

go 1.26
MOD
cat >tools.go <<'SRC'
//go:build tools

package tools

import _ "istio.io/istio/pilot/cmd/pilot-discovery"
SRC
echo "build-istiod: resolving istio.io/istio@$ISTIO_VERSION"
"$GO" get "istio.io/istio@$ISTIO_VERSION" "istio.io/api@$ISTIO_API_VERSION" "istio.io/client-go@$ISTIO_API_VERSION" \
	"github.com/envoyproxy/go-control-plane/envoy@$GCP_ENVOY_VERSION" \
	"github.com/envoyproxy/go-control-plane/contrib@$GCP_CONTRIB_VERSION"
"$GO" mod tidy -e >/dev/null 2>&1 || true
echo "build-istiod: building pilot-discovery (resolved after $((SECONDS - start)) s)"
CGO_ENABLED=0 "$GO" build -trimpath -tags tools -o "$work/out/pilot-discovery" istio.io/istio/pilot/cmd/pilot-discovery
src="$("$GO" list -m -f '{{.Dir}}' istio.io/istio)"
cp "$src/manifests/charts/base/files/crd-all.gen.yaml" "$work/out/"
chmod u+w "$work/out/crd-all.gen.yaml"

mkdir -p "$TOOLS"
# Publish atomically so a half-finished build never looks complete.
rm -rf "$DEST.tmp.$$"
mv "$work/out" "$DEST.tmp.$$"
rm -rf "$DEST"
mv "$DEST.tmp.$$" "$DEST"
echo "build-istiod: installed pilot-discovery and crd-all.gen.yaml in $DEST ($((SECONDS - start)) s, cold)"
