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
//
// # One node only: what a second node would take
//
// Cross-node HBONE between real containers (issue 16's stretch) is tested by
// tests/e2e on the lab's namespaces, not here: a second kubelet on the same
// kernel was not built, because the chart's agent would not stay on its node.
// What it would take, in order:
//
//   - The agent's cgroup root. Capture attaches at the host's cgroup2 root,
//     which the agent finds as the root of the initial cgroup namespace
//     (internal/cgroup2.HostRoot: a cgroup2 mount of it, or one it makes from
//     a host process's cgroup namespace). Two agents on one kernel would both
//     attach there and capture every pod of both nodes. A second node needs
//     its kubelet and containerd in a cgroup namespace rooted at its own
//     subtree (/<prefix>/node2, as tests/lab gives each lab node a cgroup
//     directory), and the agent must take "the host" to be the cgroup
//     namespace of its node's container runtime (e.g. of the containerd that
//     runs it, found through /proc with hostPID) instead of PID 1's; a
//     DaemonSet cannot set a different cgroup.hostRoot per node. That is an
//     agent change (internal/cgroup2, cmd/nodeagent/hostfs.go) and a doctor
//     check, not only harness work.
//   - Per node: a network namespace with the node's address on a veth to the
//     first node's bridge and routes for the other node's pod range (pods
//     198.18.64.0/21 and 198.18.72.0/21, one CNI bridge and host-local range
//     each), a mount namespace with its own bpffs at /sys/fs/bpf, its own
//     /var/run/netns, /run/warren, /var/lib/kubelet and containerd state (all
//     rshared inside it for the HostToContainer volumes), and its own
//     kube-proxy nftables tables in its network namespace. containerd runs
//     hostNetwork pods in the namespace it runs in, so the agent's pod and its
//     15020/15021/15000 ports land in the node's namespace.
//   - The kubelet's forced sysctls are per kernel, not per node: the harness's
//     save-and-restore would have to cover two kubelets starting.
//   - About 15 s more to start and 300 MB more memory (a second kubelet,
//     containerd and kube-proxy); the same binaries.
package cluster
