#!/usr/bin/env bash
# build-spire.sh builds spire-server and spire-agent from the published Go
# module (the module proxy here cannot "go install" them) into the tools cache:
#   ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}/spire-v$SPIRE_VERSION/{spire-server,spire-agent}
# Idempotent: does nothing when both binaries are already there.
# Takes about 9 minutes on 2 cores (cgo + sqlite); needs gcc.
set -euo pipefail

SPIRE_VERSION="${SPIRE_VERSION:-1.13.3}"
TOOLS="${WARREN_TOOLS_CACHE:-$HOME/.cache/warren/tools}"
DEST="$TOOLS/spire-v$SPIRE_VERSION"
GO="${GO:-go}"

if [[ -x "$DEST/spire-server" && -x "$DEST/spire-agent" ]]; then
	echo "build-spire: spire v$SPIRE_VERSION already in $DEST"
	exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/warren-spire-build.XXXXXX")"
trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT

echo "build-spire: downloading github.com/spiffe/spire@v$SPIRE_VERSION"
src="$(cd "$work" && GOFLAGS=-mod=mod GOWORK=off "$GO" mod download -json "github.com/spiffe/spire@v$SPIRE_VERSION" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
if [[ -z "$src" || ! -d "$src" ]]; then
	echo "build-spire: go mod download did not report a module directory" >&2
	exit 1
fi
cp -r "$src" "$work/spire"
chmod -R u+w "$work/spire"

echo "build-spire: building spire-server and spire-agent (about 9 minutes on 2 cores)"
mkdir -p "$work/out"
(cd "$work/spire" && CGO_ENABLED=1 GOWORK=off GOFLAGS=-mod=mod \
	"$GO" build -trimpath -o "$work/out/" ./cmd/spire-server ./cmd/spire-agent)

mkdir -p "$TOOLS"
# Publish atomically so a half-finished build never looks complete.
rm -rf "$DEST.tmp.$$"
mkdir -p "$DEST.tmp.$$"
mv "$work/out/spire-server" "$work/out/spire-agent" "$DEST.tmp.$$/"
rm -rf "$DEST"
mv "$DEST.tmp.$$" "$DEST"
echo "build-spire: installed $DEST/spire-server and $DEST/spire-agent"
