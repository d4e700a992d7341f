#!/usr/bin/env bash
# gen-workloadapi.sh generates the Go types of Istio's workload API
# (pkg/config/xds/workloadapi and .../security) from the .proto files
# committed beside them, with protoc (Debian: protobuf-compiler) and the
# protoc-gen-go of the google.golang.org/protobuf version in go.mod.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
GO="${GO:-go}"
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
"$GO" build -o "$bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
wkt="$("$GO" list -m -f '{{.Dir}}' istio.io/api)/common-protos"
stage="$bin/src"
mkdir -p "$stage/workloadapi/security"
cp pkg/config/xds/workloadapi/workload.proto "$stage/workloadapi/"
cp pkg/config/xds/workloadapi/security/authorization.proto "$stage/workloadapi/security/"
pkg=github.com/warren-mesh/warren/pkg/config/xds/workloadapi
mkdir -p "$bin/out"
PATH="$bin:$PATH" protoc -I "$stage" -I "$wkt" \
	--go_out="$bin/out" --go_opt=paths=source_relative \
	--go_opt=Mgoogle/protobuf/any.proto=google.golang.org/protobuf/types/known/anypb \
	--go_opt=Mgoogle/protobuf/wrappers.proto=google.golang.org/protobuf/types/known/wrapperspb \
	--go_opt=Mgoogle/protobuf/empty.proto=google.golang.org/protobuf/types/known/emptypb \
	--go_opt=Mworkloadapi/workload.proto=$pkg \
	--go_opt=Mworkloadapi/security/authorization.proto=$pkg/security \
	workloadapi/workload.proto workloadapi/security/authorization.proto
cp "$bin/out/workloadapi/workload.pb.go" pkg/config/xds/workloadapi/
cp "$bin/out/workloadapi/security/authorization.pb.go" pkg/config/xds/workloadapi/security/
echo "gen-workloadapi: $(protoc --version), protoc-gen-go $(go list -m -f '{{.Version}}' google.golang.org/protobuf)"
