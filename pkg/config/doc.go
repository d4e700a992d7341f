// Package config is warren's one internal configuration model: workloads,
// services, L4 authorization policies and peer-authentication modes, checked
// and frozen into an immutable [Snapshot] whose lookups take no lock and
// cost two array indexes and a scan of one small leaf (see [Snapshot]).
//
// Data flows one way: a provider that sees whole states (the local YAML
// file in [github.com/warren-mesh/warren/pkg/config/localfile]) builds a
// [Config], calls [NewSnapshot] and publishes the result to the single state
// store in [github.com/warren-mesh/warren/pkg/config/store]; providers that
// receive changes (istiod's delta xDS in
// [github.com/warren-mesh/warren/pkg/config/xds], Kubernetes informer
// events in [github.com/warren-mesh/warren/pkg/config/kube], both after a
// first full snapshot) derive the next snapshot from the current one with
// [Snapshot.Apply] (a [Delta] costs O(its items), not O(mesh), and an
// invalid item is rejected alone);
// consumers (loader enrollment, identity prefetch, the proxy, [policy] and
// [balance]) only read snapshots. Nothing here performs I/O except the
// optional existence check of local workloads' network-namespace paths.
//
// Package layout, one noun each:
//
//	pkg/config            the model and its validation (this package)
//	pkg/config/localfile  the YAML file provider (ztunnel LOCAL_XDS_PATH shape)
//	pkg/config/kube       the Kubernetes provider (informers, namespace opt-in, events applied with Apply)
//	pkg/config/xds        the istiod provider (delta ADS, applied with Apply)
//	pkg/config/store      the state store: current snapshot + change feed
//	pkg/policy            L4 authorization decisions over a snapshot
//	pkg/balance           service endpoint selection
//
// The model follows the shapes of Istio ztunnel's state, read (not copied)
// from github.com/istio/ztunnel at 62d826530e5c: src/state/workload.rs
// (Workload, Locality, HealthStatus, NamespacedHostname, NetworkAddress),
// src/state/service.rs (Service, ports, subjectAltNames, endpoints), src/rbac.rs
// (Authorization, rules → clauses → matches, StringMatch, ServiceAccountMatch),
// src/state/policy.rs (scope indexing), src/xds.rs (LocalConfig, LocalWorkload)
// and examples/localhost.yaml. Warren's extensions are a local workload's
// network-namespace and cgroup paths, and peer-authentication modes
// (STRICT/PERMISSIVE) that ztunnel receives from istiod as converted policies.
//
// [policy]: github.com/warren-mesh/warren/pkg/policy
// [balance]: github.com/warren-mesh/warren/pkg/balance
package config
