// Package workloadapi holds the Go types of Istio's workload API
// (istio.workload.Address, Workload, Service), generated with protoc-gen-go
// from workload.proto as istio/istio publishes it in pkg/workloadapi
// (copied verbatim from istio.io/istio@v0.0.0-20260827124520-eed52ebb66ad;
// only the Go package differs, set with protoc's M option). The output is
// committed, as bpf2go's is, so `go build` needs only Go; `go generate`
// regenerates it (needs protoc, Debian's protobuf-compiler, and reads the
// well-known types from istio.io/api's common-protos).
//
// Why not import istio.io/istio/pkg/workloadapi: see package
// github.com/warren-mesh/warren/pkg/config/xds.
package workloadapi

//go:generate ../../../../hack/gen-workloadapi.sh
