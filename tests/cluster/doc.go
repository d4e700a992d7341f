// Package cluster runs a real single-node Kubernetes cluster on the test
// machine — etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// the kubelet with containerd and runc, and kube-proxy in nftables mode —
// for the tests that install charts/warren on a real node.
//
// Like tests/lab, a run names everything with its prefix ("wk" and six
// characters) and holds /run/warren-cluster/<prefix>.lock; Start first
// removes what crashed runs left (CleanStale, also run by make clean-lab),
// and Stop removes everything: pods (through the kubelet, so CNI tears their
// namespaces down), daemons (SIGTERM by PID, then every process left in the
// run's cgroups), mounts under the run's directories, the bridge
// <prefix>br, cgroups /<prefix>, kube-proxy's nftables tables, the shared
// mounts it made, and the sysctls the kubelet forces (saved before it starts,
// restored right after and at the end). One cluster runs on a host at a time
// (/run/warren-cluster/host.lock).
//
// Addresses: the node is 198.18.81.1 on the bridge, pods get 198.18.64.0/20,
// Services 198.18.80.0/24; pods have routes to those only (no default route),
// their resolver is their own loopback, and the apiserver reaches the kubelet
// by IP, so no traffic and no DNS query leaves the machine. The kubelet and
// kube-proxy run with a PATH without iptables.
//
// Binaries: Kubernetes and helm from the tools cache (make tools:
// hack/build-envtest.sh, hack/build-helm.sh), containerd, runc, the CNI
// plugins, nft and conntrack from apt (make deps). Images are built without a
// container engine (internal/ociimage) and imported with ctr.
package cluster
