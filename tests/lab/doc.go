// Package lab builds a virtual Kubernetes-like cluster on one Linux host, for
// warren's end-to-end tests, demo and benchmarks.
//
// A lab is a set of network namespaces and cgroups named with a per-run
// prefix (for example "wlk3f9a2"):
//
//	<prefix>-ul                 underlay: bridge br0 joining the nodes
//	<prefix>-<node>             a node: eth0 on the underlay, bridge cni0 for its pods
//	<prefix>-<node>-<pod>       a pod: eth0 on its node's cni0, its own cgroup
//
// Address plan (only the benchmarking ranges 198.18.0.0/15 and 2001:2::/48):
//
//	underlay        198.18.0.0/24, 2001:2::/64       node i has .10+i and ::a+i
//	pods of node i  198.19.i.0/24, 2001:2:0:10i::/64 gateway .1 / ::1 on cni0,
//	                                                 pod j has .10+j / ::a+j
//
// Each node routes the other nodes' pod CIDRs via their underlay address, so
// pod-to-pod traffic across nodes works as on a flat CNI. Each node has a
// cgroup v2 directory <cgroup2 mount>/warren-lab/<prefix>/<node>/ standing in
// for a host's cgroup root, with system/ for the processes started on the node
// (agents) and pods/<pod>/ for each pod, so cgroup BPF programs see lab
// processes exactly as they would see a container's.
//
// Nothing is created in the host's network namespace. A run holds an flock on
// /run/warren-lab/<prefix>.lock; Close removes everything the run created, and
// New (or CleanStale, behind make clean-lab) removes what runs that no longer
// hold their lock left behind.
package lab
