// Package xds is the istiod configuration provider (--provider=istiod): it
// takes warren's whole configuration from Istio's control plane the way
// ztunnel does, and publishes it to the store like the other providers.
//
// # Protocol
//
// One delta ADS stream (envoy.service.discovery.v3, go-control-plane's
// types) to istiod's xDS port (15012), TLS verified against the mesh root,
// the agent's projected ServiceAccount token as bearer credentials (read at
// each stream, so rotation needs nothing). The node ID and metadata are
// ztunnel's: "ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local" and NAME,
// NAMESPACE, INSTANCE_IPS, NODE_NAME, CLUSTER_ID; istiod authorizes the
// namespace against the token's. Two wildcard subscriptions:
// type.googleapis.com/istio.workload.Address (Workloads, named by UID, and
// Services, named "namespace/hostname") and
// type.googleapis.com/istio.security.Authorization ("namespace/name").
//
// Each response is converted resource by resource, once, when it arrives,
// and applied to the current snapshot as a delta (config.Snapshot.Apply):
// a push touching N resources costs O(N) plus what they invalidate (the
// endpoint lists of the services a changed workload backs, its node's
// list), not O(mesh), and the snapshot is the provider's only copy of the
// mesh (the store publishes that same snapshot). The provider keeps beside
// it only what the snapshot cannot say: the resources' notes, and the
// workloads published otherwise than sent (references not received yet,
// this node's mesh workloads and their network namespaces). Only the first
// response of each type on a stream walks the whole state (to find the
// names it no longer lists), and so does a policy removal or a scope change
// away from WorkloadSelector while workloads still list the policy (to find
// them).
//
// # ACK, NACK, keep the previous state
//
// A resource that cannot be applied — it does not decode, has no usable
// address, a tunnel protocol warren cannot speak (a sidecar's
// LEGACY_ISTIO_MTLS: plain TCP would bypass its mTLS), an unknown status,
// scope or action, or it makes the whole configuration invalid (an IP
// another workload owns) — is rejected: the response is NACKed with an
// error detail naming each rejected resource and why, and that resource's
// previous version (or its absence) stays. The other resources of the same
// response apply, as ztunnel does. The first response of each type on a
// stream is istiod's whole state of that type, so names it does not list
// are removed (what was deleted while the stream was down).
//
// An Authorization whose values cannot be used (an out-of-range port or
// prefix length, a pattern with a wildcard inside, a service account with a
// slash, an extension) is not rejected: it fails closed exactly like the
// Kubernetes provider's policies, through the same parsers (package
// istioval): the group is recorded in config.AuthorizationPolicy.Invalid and
// left out of Rules, so an ALLOW grants nothing by it and a DENY denies its
// whole scope (package policy). Rejecting it instead would keep its previous
// version, which may be wider.
//
// References istiod has not sent (yet) — a workload naming a service or a
// WorkloadSelector policy that is not known — are ignored until they
// arrive, as ztunnel does; the model requires every reference to resolve.
// When the service or policy arrives, the workloads waiting for it are
// applied again with the reference; when it is removed (or the policy's
// scope is no longer WorkloadSelector) while workloads still name it, their
// reference is dropped in the same push. Status.Notes lists the workloads
// whose references are ignored.
//
// # Waypoints
//
// A Workload's or Service's waypoint (a GatewayAddress: an IP, which may be
// the waypoint service's VIP, or the waypoint service's namespace/hostname,
// and the HBONE port) becomes config.Waypoint. The agent then sends traffic
// to that service's VIPs, or to that workload's own addresses, over HBONE to
// the waypoint — to a waypoint workload picked like any service endpoint,
// expecting its identity (or its service's subjectAltNames), with the
// original destination as the CONNECT authority, as ztunnel does — never to
// the destination directly; a waypoint that resolves to no known workload
// gets nothing through (fail closed, response flag UH). Tunnels from a
// waypoint to the workloads it fronts are authorized like any peer's, on
// the waypoint's identity (package ztunnel). A waypoint that cannot be
// converted, and weightedWaypoints (not supported), reject the resource:
// applying it without its waypoint would bypass the waypoint's policy.
// A service's loadBalancing (mode STRICT or FAILOVER over the routing
// preference's scopes, health policy ALLOW_ALL) becomes
// config.LoadBalancing and is applied as ztunnel applies it (package
// balance); PASSTHROUGH is reported in Status.Notes and an endpoint is
// picked; an enum value this build does not know rejects the service.
// Not honoured yet (reported in Status.Notes): network gateways;
// ingressUseWaypoint is not needed at L4.
//
// # Availability
//
// Nothing is published until the first push of both types has applied:
// until then the agent's readiness says it waits for istiod. While istiod
// is away (stream errors, restarts) the last applied configuration stays
// in force and the provider reconnects with exponential backoff (100 ms to
// 15 s); established connections are never touched by the provider.
//
// # Local pods
//
// istiod marks a local workload HBONE when the pod carries
// ambient.istio.io/redirection=enabled; the agent enrolls those of its own
// node (Workload.node) and needs each one's network namespace. istio-cni
// writes the annotation for ztunnel; under warren it is off, and with
// --annotate-pods the agent writes it (kube.Annotator: the Kubernetes
// provider's rules, this node's pods and the namespaces, and only once the
// pod's network namespace is found) and removes it when the pod stops
// qualifying, so istiod turns the workload back and the agent unenrolls it.
// Order window: between the annotation and the agent's enrollment after
// istiod's push, a peer could already send HBONE to the pod, which is then
// refused until capture is set up; traffic to a brand-new pod is normally
// gated by its readiness, which comes later. Istio's Workload
// does not carry the pod's Kubernetes UID, which names the pod's cgroup, so
// the agent keeps one informer on the Pods of its own node only (field
// selector spec.nodeName, stripped to name, namespace and UID: no
// cluster-wide reads, RBAC list/watch on pods) and hands the UIDs to the
// Kubernetes provider's /proc resolver (kube.ProcResolver: the pod UID in
// its processes' cgroup path, preferring a bind mount under
// /var/run/netns). That reuses the one resolver warren has, works with
// every container runtime and CNI, and needs no CRI socket or istio-cni
// ZDS socket (both would tie the agent to a component's private protocol).
// The race of a pod whose processes are not found yet is the Kubernetes
// provider's, documented there: the pod is published outside the mesh until
// found. This node's mesh workloads are rechecked every second
// (RetryInterval); one whose network namespace was found, moved or went
// away is applied again.
//
// # Types
//
// The workload API's Go types are generated from Istio's own workload.proto
// and authorization.proto (package workloadapi, committed like bpf2go's
// output, hack/gen-workloadapi.sh). Measured against importing
// istio.io/istio/pkg/workloadapi (+ /security) at the version istiod is
// built from, nodeagent built with -ldflags "-s -w": the binary is the
// same size either way (70.99 MB default, 21.99 MB nokube, 8 KB more with
// Istio's vtproto code) and so is the RSS after package initialisation
// (40.7 vs 40.3 MB, 18.2 MB both); the provider itself (grpc, go-control-
// plane's discovery and core types) adds 3.1 MB of binary and 1.3 MB (2.3 MB
// nokube) of RSS to an agent in file mode (67.9 MB, 39.4 MB RSS). The drag
// is in go.mod: Istio's package makes the agent require the pseudo-versioned
// istio.io/istio module, which raises three unrelated dependencies for every
// package of warren (fsnotify, jsonpatch, vtprotobuf) and ties every future
// upgrade to a module of istiod's size; the generated types need only
// google.golang.org/protobuf, already required.
package xds
