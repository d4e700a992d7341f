#!/usr/bin/env bash
# build-envtest.sh builds a Kubernetes control plane for tests (envtest) from the
# published Go modules (nothing here can download release binaries) into the
# tools cache, laid out as controller-runtime's KUBEBUILDER_ASSETS expects:
#   ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}/envtest-v$KUBE_VERSION/
#       kube-apiserver etcd  [kubectl kube-controller-manager]
# warren's tests need only kube-apiserver and etcd: they create EndpointSlices
# themselves and validate the chart with server-side dry runs from Go.
# ENVTEST_EXTRA="kubectl kube-controller-manager" adds those (about 5 more
# minutes) for manual work.
#
# The real-node tests (tests/cluster) also need a node and the rest of the
# control plane; they are built by the same `go build` as kube-apiserver (one
# prepared k8s.io/kubernetes copy, one compile of the shared packages) into
#   ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}/kube-node-v$KUBE_VERSION/
#       kubelet kube-proxy kube-controller-manager kube-scheduler
# KUBE_NODE=0 skips them.
# Idempotent: does nothing when every binary is already there; builds only
# what is missing.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
TOOLS="${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}"
DEST="$TOOLS/envtest-v$KUBE_VERSION"
GO="${GO:-go}"
read -r -a EXTRA <<<"${ENVTEST_EXTRA:-}"
BINS=(kube-apiserver etcd "${EXTRA[@]}")
NODE_DEST="$TOOLS/kube-node-v$KUBE_VERSION"
NODE_BINS=()
[[ "${KUBE_NODE:-1}" == 1 ]] && NODE_BINS=(kubelet kube-proxy kube-controller-manager kube-scheduler)

complete=1
for b in "${BINS[@]}"; do [[ -x "$DEST/$b" ]] || complete=0; done
node_missing=()
for b in "${NODE_BINS[@]}"; do [[ -x "$NODE_DEST/$b" ]] || node_missing+=("$b"); done
if [[ $complete == 1 && ${#node_missing[@]} == 0 ]]; then
	echo "build-envtest: envtest v$KUBE_VERSION already in $DEST${NODE_BINS:+, node binaries in $NODE_DEST}"
	exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/warren-envtest-build.XXXXXX")"
trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/out" "$work/node"
start=$SECONDS

download() { # module@version -> directory in the module cache
	(cd "$work" && GOFLAGS=-mod=mod GOWORK=off "$GO" mod download -json "$1" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
}

# etcd: the server module's go.mod points at sibling directories; use the published ones.
if [[ -x "$DEST/etcd" ]]; then
	cp -p "$DEST/etcd" "$work/out/etcd"
else
echo "build-envtest: downloading go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
src="$(download "go.etcd.io/etcd/server/v3@v$ETCD_VERSION")"
[[ -n "$src" && -d "$src" ]] || { echo "build-envtest: no module directory for etcd" >&2; exit 1; }
cp -r "$src" "$work/etcd" && chmod -R u+w "$work/etcd"
sed -i -E 's#^([[:space:]]*)(go\.etcd\.io/etcd/([a-z0-9/]+)/v3)[[:space:]]*=>[[:space:]]*\.\./[a-z0-9/]+[[:space:]]*$#\1\2 => \2 v'"$ETCD_VERSION"'#' "$work/etcd/go.mod"
sed -i -E 's#^replace[[:space:]]+(go\.etcd\.io/etcd/([a-z0-9/]+)/v3)[[:space:]]*=>[[:space:]]*\.\./.*$#replace \1 => \1 v'"$ETCD_VERSION"'#' "$work/etcd/go.mod"
if grep -q '=> \.\./' "$work/etcd/go.mod"; then
	echo "build-envtest: etcd go.mod still has local replaces:" >&2; grep '=> \.\./' "$work/etcd/go.mod" >&2; exit 1
fi
echo "build-envtest: building etcd"
(cd "$work/etcd" && CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=mod "$GO" build -trimpath -o "$work/out/etcd" .)
echo "build-envtest: etcd built after $((SECONDS - start)) s"
fi

# Kubernetes: staging replaces point into the module; use the published k8s.io/X v0.MINOR.PATCH.
echo "build-envtest: downloading k8s.io/kubernetes@v$KUBE_VERSION"
src="$(download "k8s.io/kubernetes@v$KUBE_VERSION")"
[[ -n "$src" && -d "$src" ]] || { echo "build-envtest: no module directory for kubernetes" >&2; exit 1; }
cp -r "$src" "$work/kubernetes" && chmod -R u+w "$work/kubernetes"
staging="v0.${KUBE_VERSION#1.}"
sed -i -E '/k8s\.io\/sample-cli-plugin[[:space:]]*=>/d' "$work/kubernetes/go.mod"
sed -i -E 's#(k8s\.io/[a-z0-9-]+)[[:space:]]*=>[[:space:]]*\./staging/src/k8s\.io/[a-z0-9-]+#\1 => \1 '"$staging"'#' "$work/kubernetes/go.mod"
if grep -q '=> \./staging' "$work/kubernetes/go.mod"; then
	echo "build-envtest: kubernetes go.mod still has staging replaces" >&2; exit 1
fi
ldflags="-X k8s.io/component-base/version.gitVersion=v$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=${KUBE_VERSION%%.*} -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=v$KUBE_VERSION"
# One go build for every command still missing: the packages they share
# (most of k8s.io/kubernetes) compile once.
cmds=()
for cmd in kube-apiserver "${EXTRA[@]}"; do [[ -x "$DEST/$cmd" ]] && cp -p "$DEST/$cmd" "$work/out/" || cmds+=("$cmd"); done
for cmd in "${node_missing[@]}"; do cmds+=("$cmd"); done
pkgs=(); for cmd in "${cmds[@]}"; do pkgs+=("./cmd/$cmd"); done
echo "build-envtest: building ${cmds[*]} (one go build)"
(cd "$work/kubernetes" && CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=mod \
	"$GO" build -trimpath -ldflags "$ldflags" -o "$work/out/" "${pkgs[@]}")
echo "build-envtest: ${cmds[*]} built after $((SECONDS - start)) s"
for cmd in "${NODE_BINS[@]}"; do
	if [[ -x "$work/out/$cmd" ]]; then mv "$work/out/$cmd" "$work/node/"; elif [[ -x "$NODE_DEST/$cmd" ]]; then cp -p "$NODE_DEST/$cmd" "$work/node/"; fi
done

mkdir -p "$TOOLS"
# Publish atomically so a half-finished build never looks complete.
rm -rf "$DEST.tmp.$$"
mv "$work/out" "$DEST.tmp.$$"
# Keep extras built earlier when this run did not build them.
for b in "$DEST"/*; do [[ -e "$b" && ! -e "$DEST.tmp.$$/$(basename "$b")" ]] && cp -p "$b" "$DEST.tmp.$$/"; done
rm -rf "$DEST"
mv "$DEST.tmp.$$" "$DEST"
if [[ ${#NODE_BINS[@]} -gt 0 ]]; then
	rm -rf "$NODE_DEST.tmp.$$"
	mv "$work/node" "$NODE_DEST.tmp.$$"
	rm -rf "$NODE_DEST"
	mv "$NODE_DEST.tmp.$$" "$NODE_DEST"
fi
echo "build-envtest: installed ${BINS[*]} in $DEST${NODE_BINS:+, ${NODE_BINS[*]} in $NODE_DEST} ($((SECONDS - start)) s)"
