// Package security holds the Go types of Istio's workload authorization API
// (istio.security.Authorization), generated with protoc-gen-go from
// authorization.proto as istio/istio publishes it in pkg/workloadapi/security.
// See package github.com/warren-mesh/warren/pkg/config/xds/workloadapi.
package security
