#!/usr/bin/env bash
# build-helm.sh builds helm from its Go module into the tools cache:
#   ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}/helm-v$HELM_VERSION/helm
# and, with WITH_KUBECONFORM=1, kubeconform (the chart tests validate with a
# server-side dry run against envtest instead, so it is not needed):
#   ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}/kubeconform-v$KUBECONFORM_VERSION/kubeconform
# Idempotent: a tool already there is not rebuilt.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-3.22.0}"
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-0.8.0}"
TOOLS="${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}"
GO="${GO:-go}"

install() { # name version package
	local name=$1 version=$2 pkg=$3 dest="$TOOLS/$1-v$2"
	if [[ -x "$dest/$name" ]]; then
		echo "build-helm: $name v$version already in $dest"
		return
	fi
	local start=$SECONDS tmp="$dest.tmp.$$"
	echo "build-helm: building $name v$version"
	rm -rf "$tmp" && mkdir -p "$tmp"
	# go install pkg@version builds it as its own main module, outside this repo.
	(cd "$tmp" && GOWORK=off GOFLAGS= GOBIN="$tmp" CGO_ENABLED=0 "$GO" install -trimpath "$pkg@v$version")
	# Publish atomically so a half-finished build never looks complete.
	rm -rf "$dest"
	mv "$tmp" "$dest"
	echo "build-helm: installed $dest/$name ($((SECONDS - start)) s)"
}

install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
if [[ "${WITH_KUBECONFORM:-0}" == 1 ]]; then
	install kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform
fi
