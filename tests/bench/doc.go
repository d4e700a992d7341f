// Package bench measures what the warren mesh costs on the lab, side by side
// with direct TCP and a classic mTLS tunnel pair, in one run.
//
// Topology (tests/mesh's standard cluster plus three pods outside the mesh):
//
//	node1: client1, server1 (mesh)   bclient, bsame (not in the configuration)
//	node2: client2, server2 (mesh)   bserver, outside (not in the configuration)
//
// Paths, each from a client pod on node1:
//
//	direct            bclient → bserver            plain TCP across nodes, no proxy
//	direct_same_node  bclient → bsame              plain TCP on one node
//	warren            client1 → server2            captured, HBONE between the two agents
//	warren_same_node  client1 → server1            captured, HBONE inside node1's agent
//	tunnel            bclient → stunnel → stunnel → bserver
//	                  stunnel4 client in bclient's netns, stunnel4 server in
//	                  bserver's netns (sidecar-like: each proxy shares its
//	                  pod's network namespace), TLS 1.3 AES-128-GCM, mutual
//	                  certificate verification, one TLS connection per TCP
//	                  connection as a sidecar's TCP proxy does.
//	haproxy           bclient → HAProxy → HAProxy → bserver
//	                  the same topology, certificates and TLS settings with
//	                  two HAProxy processes in TCP mode (event-driven, like
//	                  the agents): the second classic-tunnel anchor. Ratios
//	                  against "the best pair" take the better of the two
//	                  for each figure.
//
// Scenarios: (1) single-stream bulk, (2) 8 parallel streams, (3) 1 KiB
// request/response at a fixed 1,000 requests/s over 4 connections with
// p50/p90/p99 (Istio's method), (4) new connections per second (connect,
// 1 KiB echo, close), (5) 10,000 concurrent idle connections (proxy RSS and
// bytes per connection; the agents and the tunnel pair are restarted before
// each run of it so each starts from the same heap), (6) proxy CPU seconds
// per 1,000 requests with request/response as fast as 4 connections go.
//
// Proxy CPU is utime+stime from /proc/<pid>/stat of the agents (warren
// paths) or of the two stunnel or HAProxy processes (pair paths), RSS is VmRSS from
// /proc/<pid>/status. Each scenario runs on every path once per run, runs
// repeat (5 by default) with the path order rotated, and the report keeps
// every run, the median of each metric and (in the markdown) the min–max
// spread, and evaluates issue 15's targets. Physical context comes from the
// same process: AES-128-GCM and crypto/tls throughput per CPU-second, and
// plain TCP over the lab's underlay veths.
//
// Everything is bounded: each client stops after its duration, the lab is
// removed at the end, and Run returns within a few minutes.
package bench
