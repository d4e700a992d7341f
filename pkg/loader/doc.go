// Package loader loads, attaches, pins and inspects warren's eBPF capture of
// enrolled pods' TCP connections. The C programs are in bpf/ (one thin file
// per hook, shared code in bpf/lib); bpf2go compiles them into the committed
// *_bpfel.o and *_bpfel.go files here (see gen.go), so building needs only Go.
//
// # Data path
//
//   - Outbound: cgroup/connect4 and cgroup/connect6 (wr_connect4,
//     wr_connect6), attached once at Config.CgroupPath. For a TCP socket in an
//     enrolled network namespace that does not carry SO_MARK Mark and whose
//     destination is not loopback, an excluded port or an excluded CIDR, the
//     destination is rewritten to the pod's outbound listener (127.0.0.1 or
//     ::1, port EnrollOptions.OutboundPort; IPv4-mapped destinations go to
//     ::ffff:127.0.0.1 and are recorded as IPv4) and the original destination
//     is recorded under the socket cookie (wr_pending).
//   - Original destination: sockops (wr_sockops), same cgroup. When the
//     client's connect is ESTABLISHED the record moves to wr_orig, keyed by
//     netns cookie + 4-tuple (loopback tuples repeat in every pod, the netns
//     cookie tells them apart). When the agent's accepted socket becomes
//     ESTABLISHED in an enrolled netns it asks for state callbacks, and the
//     record is deleted when that socket closes. The agent's side, not the
//     client's: a client that writes and closes at once must not lose its
//     record before the agent reads it. wr_orig is an LRU, so records of
//     connections the agent never accepted cannot pile up. OriginalDst reads
//     it in O(1).
//   - SO_ORIGINAL_DST: cgroup/getsockopt (wr_getsockopt), same cgroup, answers
//     getsockopt(SOL_IP, SO_ORIGINAL_DST) and getsockopt(SOL_IPV6,
//     IP6T_SO_ORIGINAL_DST) on an accepted captured connection from wr_orig,
//     so a proxy written for iptables REDIRECT works unchanged.
//   - getpeername/getsockname: cgroup/getpeername4|6 and getsockname4|6
//     (wr_getpeername4/6, wr_getsockname4/6), same cgroup, answer an app's
//     captured socket with its original destination (wr_orig) and with the
//     pod's address of its family (wr_pod_ip, EnrollOptions.PodIPs), as
//     iptables REDIRECT does through conntrack.
//   - Transparent connects: sockops records a connect of a socket marked
//     TransparentMark in an enrolled netns (wr_tpass) from connect to
//     ESTABLISHED or close; sk_lookup lets its SYN reach the app.
//   - Inbound: sk_lookup (wr_sk_lookup), one link per enrolled netns. A TCP
//     SYN from outside the pod (not from loopback, not from the pod's own
//     address, not to Config.HBONEPort, not from EnrollOptions.ExemptSources)
//     is steered to the inbound listener (wr_inbound sockmap); the accepted
//     socket's local address is the original destination. The agent reaches
//     the app via loopback or via the pod's own address (with Mark, so
//     outbound capture skips it too): both are passed, never recaptured.
//
// # Why enrollment is keyed by network namespace cookie
//
// The agent's listeners live in the pod's netns, so the netns is what a
// redirect must stay inside; every process of the pod (all containers, any
// cgroup layout a runtime picks, processes that move cgroups) shares it; the
// cookie is unique for the kernel's uptime and never reused; sk_lookup is
// attached per netns anyway; and a per-cgroup key would need one entry per
// container cgroup and would break with nested or delegated cgroups. The
// connect and sockops programs read it with bpf_get_netns_cookie, Go with
// getsockopt(SO_NETNS_COOKIE) on a socket inside the netns.
//
// # Lifecycle
//
// Open creates or reuses everything under Config.PinDir: maps pinned by name,
// cgroup links link_connect4, link_connect6, link_sockops, link_getsockopt
// and netns/<cookie>
// for each enrolled pod's sk_lookup. A second Open (agent restart or upgrade)
// replaces the programs of the pinned links with link.Update, atomically, and
// reuses the maps, so capture never lapses. Close keeps everything pinned and
// attached; Uninstall detaches and removes it all. If PinDir's parent is not
// a bpffs, Open mounts one there (hosts without /sys/fs/bpf mounted).
//
// Pinned maps must keep their layout across versions: if a new version
// changes a map, Open fails with ebpf.ErrMapIncompatible and the operator
// runs Uninstall first (capture then lapses until the new Open).
//
// # Agent contract
//
//   - Mark every socket the agent opens with SO_MARK Mark.
//   - Listen with plain TCP: Go since 1.24 listens with MPTCP by default
//     (net.ListenConfig.SetMultipathTCP(false)); a sockmap cannot hold an
//     MPTCP listener and Enroll refuses one. Likewise MPTCP client sockets in
//     pods are not captured.
//   - Open the listeners inside the pod's netns before Enroll; on upgrade,
//     Enroll the new inbound listener before the old one closes (the kernel
//     drops a closed listener from wr_inbound, and SYNs then reach the app
//     uncaptured until a listener is enrolled again).
//   - Call OriginalDst on each connection accepted on the outbound listener
//     (or getsockopt SO_ORIGINAL_DST, which answers from the same map).
//   - After a restart, compare Enrolled with the pods it knows and Unenroll
//     the rest (Open already forgets pods whose netns is gone and had an
//     sk_lookup link).
//   - Enroll takes a netns path; for a netns held as a file descriptor pass
//     /proc/self/fd/<fd>.
//
// # Kernel floor: Linux 5.15
//
// bpf_get_netns_cookie in sockops (5.15) sets the floor; SO_NETNS_COOKIE is
// 5.14, sk_lookup 5.9, bpf_get_netns_cookie in cgroup/getsockopt 5.8,
// cgroup bpf_link 5.7, bpf_get_netns_cookie in cgroup/connect 5.7. Probe checks each with cilium/ebpf/features and names
// what is missing and the version that brings it.
package loader
