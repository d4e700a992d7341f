// Package ztunnel is warren's L4 tunnel: the listeners the agent opens inside
// each enrolled pod's network namespace, and what they do with a connection.
//
// Data flows one way: the configuration store (pkg/config/store) tells the
// Proxy which local workloads exist; for each it acquires the workload's
// certificate (pkg/identity), opens its listeners, and enrolls its network
// namespace for capture (pkg/loader). Then:
//
//	:15001 outbound   (127.0.0.1, ::1)  captured connects from the pod. The
//	                  original destination (loader) is resolved to a service
//	                  endpoint or workload; mesh (HBONE) destinations get a
//	                  tunnel from the pod's address to <dst>:15008 with the
//	                  pod's identity (pkg/hbone); anything else passes through
//	                  as plain TCP. With Deps.SameNodeFastPath, a destination
//	                  pod of this agent gets the destination's checks in
//	                  place and a splice(2) relay instead (samenode.go).
//	:15008 HBONE      (pod addresses)   tunnels from other agents: the peer's
//	                  identity is authorized (pkg/policy), then the app is
//	                  dialed inside the pod from the tunnel's source, which
//	                  must be a workload of the peer's identity
//	                  (transparent.go, pkg/transparent).
//	:15006 plaintext  (pod addresses)   connects from outside the mesh,
//	                  steered by sk_lookup: refused in STRICT mode, else
//	                  authorized and passed to the app.
//
// Every socket the agent opens carries SO_MARK loader.Mark, so capture never
// takes it twice. Listeners use SO_REUSEPORT so that a new agent binds beside
// the old one during a restart, and the pinned BPF state outlives the process.
package ztunnel
