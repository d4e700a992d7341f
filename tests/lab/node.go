package lab

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Node is a lab node: a network namespace on the underlay with a bridge
// (cni0) for its pods, and a cgroup for the processes started on it (agents).
type Node struct {
	lab   *Lab
	name  string
	index int
	ns    netns.NsHandle

	underlayV4, underlayV6 netip.Addr
	podCIDRv4, podCIDRv6   netip.Prefix

	pods  map[string]*Pod
	order []*Pod
}

// AddNode creates a node. Names are 1-12 lowercase letters or digits, starting
// with a letter, and unique in the lab; on a bad name nothing changes.
func (l *Lab) AddNode(name string) (*Node, error) {
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("lab: node name %q must match %s", name, nameRE)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("lab: add node %s: lab is closed", name)
	}
	if _, ok := l.nodes[name]; ok {
		return nil, fmt.Errorf("lab: node %s already exists", name)
	}
	if len(l.order) >= maxNodes {
		return nil, fmt.Errorf("lab: add node %s: at most %d nodes", name, maxNodes)
	}
	i := len(l.order) + 1
	n := &Node{
		lab:        l,
		name:       name,
		index:      i,
		underlayV4: addrAdd(l.cfg.UnderlayV4.Addr(), 10+i),
		underlayV6: addrAdd(l.cfg.UnderlayV6.Addr(), 10+i),
		podCIDRv4:  netip.PrefixFrom(addrSetByte(l.cfg.PodsV4.Addr(), 2, byte(i)), 24),
		podCIDRv6:  netip.PrefixFrom(addrSetByte(l.cfg.PodsV6.Addr(), 7, byte(i)), 64),
		pods:       map[string]*Pod{},
	}
	if err := n.create(l.order); err != nil {
		n.destroy()
		return nil, fmt.Errorf("lab: add node %s: %w", name, err)
	}
	l.nodes[name] = n
	l.order = append(l.order, n)
	return n, nil
}

func (n *Node) nsName() string { return n.lab.nsName(n.name) }

func (n *Node) create(peers []*Node) error {
	var err error
	for _, dir := range []string{n.CgroupRoot(), n.CgroupPath(), filepath.Join(n.CgroupRoot(), "pods")} {
		if err = os.Mkdir(dir, 0o755); err != nil {
			return fmt.Errorf("create cgroup: %w", err)
		}
	}
	if n.ns, err = newNamedNS(n.nsName()); err != nil {
		return err
	}
	// Before any link exists: links copy accept_dad from "default" when they
	// are created, and a link-local address in DAD delays the first IPv6
	// packets across nodes by a second or two.
	if err := inNetNS(n.ns, func() error {
		return writeSysctls(map[string]string{
			"net/ipv4/ip_forward":              "1",
			"net/ipv6/conf/all/forwarding":     "1",
			"net/ipv6/conf/all/accept_dad":     "0",
			"net/ipv6/conf/default/accept_dad": "0",
		})
	}); err != nil {
		return err
	}
	ul, err := netlink.NewHandleAt(n.lab.underlay)
	if err != nil {
		return fmt.Errorf("netlink in underlay: %w", err)
	}
	defer ul.Close()
	h, err := netlink.NewHandleAt(n.ns)
	if err != nil {
		return fmt.Errorf("netlink in node: %w", err)
	}
	defer h.Close()

	// Underlay port n<i> on br0; its peer is born inside the node as eth0.
	br, err := ul.LinkByName("br0")
	if err != nil {
		return fmt.Errorf("find underlay bridge: %w", err)
	}
	port := fmt.Sprintf("n%d", n.index)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: port, MasterIndex: br.Attrs().Index},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(int(n.ns)),
	}
	if err := ul.LinkAdd(veth); err != nil {
		return fmt.Errorf("add underlay veth %s: %w", port, err)
	}
	if err := linkUp(ul, port); err != nil {
		return err
	}
	for _, name := range []string{"lo", "eth0"} {
		if err := linkUp(h, name); err != nil {
			return err
		}
	}
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("find node eth0: %w", err)
	}
	if err := addAddr(h, eth0, netip.PrefixFrom(n.underlayV4, n.lab.cfg.UnderlayV4.Bits())); err != nil {
		return err
	}
	if err := addAddr(h, eth0, netip.PrefixFrom(n.underlayV6, n.lab.cfg.UnderlayV6.Bits())); err != nil {
		return err
	}

	// cni0 carries the pods' gateway addresses, as the bridge CNI plugin does.
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "cni0"}}); err != nil {
		return fmt.Errorf("add cni0: %w", err)
	}
	cni0, err := h.LinkByName("cni0")
	if err != nil {
		return fmt.Errorf("find cni0: %w", err)
	}
	if err := addAddr(h, cni0, netip.PrefixFrom(n.GatewayV4(), 24)); err != nil {
		return err
	}
	if err := addAddr(h, cni0, netip.PrefixFrom(n.GatewayV6(), 64)); err != nil {
		return err
	}
	if err := h.LinkSetUp(cni0); err != nil {
		return fmt.Errorf("set cni0 up: %w", err)
	}

	// Flat routing: every node reaches every other node's pod CIDRs via its underlay address.
	for _, p := range peers {
		if err := p.routeTo(n); err != nil {
			return err
		}
		if err := n.routeTo(p); err != nil {
			return err
		}
	}
	return nil
}

// routeTo installs routes in n towards dst's pod CIDRs.
func (n *Node) routeTo(dst *Node) error {
	h, err := netlink.NewHandleAt(n.ns)
	if err != nil {
		return fmt.Errorf("netlink in node %s: %w", n.name, err)
	}
	defer h.Close()
	for _, r := range []struct {
		dst netip.Prefix
		via netip.Addr
	}{{dst.podCIDRv4, dst.underlayV4}, {dst.podCIDRv6, dst.underlayV6}} {
		route := &netlink.Route{Dst: prefixToIPNet(r.dst), Gw: net.IP(r.via.AsSlice())}
		if err := h.RouteAdd(route); err != nil {
			return fmt.Errorf("route %s via %s on %s: %w", r.dst, r.via, n.name, err)
		}
	}
	return nil
}

// destroy removes what a half-built node created.
func (n *Node) destroy() {
	if n.ns.IsOpen() {
		n.ns.Close()
	}
	netns.DeleteNamed(n.nsName())
	if ul, err := netlink.NewHandleAt(n.lab.underlay); err == nil {
		if link, err := ul.LinkByName(fmt.Sprintf("n%d", n.index)); err == nil {
			ul.LinkDel(link)
		}
		ul.Close()
	}
	rmCgroupTree(n.CgroupRoot())
}

// Name returns the node's name.
func (n *Node) Name() string { return n.name }

// IPv4 returns the node's underlay IPv4 address.
func (n *Node) IPv4() netip.Addr { return n.underlayV4 }

// IPv6 returns the node's underlay IPv6 address.
func (n *Node) IPv6() netip.Addr { return n.underlayV6 }

// PodCIDRv4 returns the node's IPv4 pod range.
func (n *Node) PodCIDRv4() netip.Prefix { return n.podCIDRv4 }

// PodCIDRv6 returns the node's IPv6 pod range.
func (n *Node) PodCIDRv6() netip.Prefix { return n.podCIDRv6 }

// GatewayV4 returns the pods' IPv4 default gateway (on cni0).
func (n *Node) GatewayV4() netip.Addr { return n.podCIDRv4.Addr().Next() }

// GatewayV6 returns the pods' IPv6 default gateway (on cni0).
func (n *Node) GatewayV6() netip.Addr { return n.podCIDRv6.Addr().Next() }

// NetNSPath returns the path of the node's network namespace.
func (n *Node) NetNSPath() string { return filepath.Join(netnsDir, n.nsName()) }

// NetNS returns the node's namespace handle, owned by the lab: do not close it.
func (n *Node) NetNS() netns.NsHandle { return n.ns }

// CgroupRoot returns the node's cgroup directory, the lab's stand-in for a
// host's cgroup2 root: the node's processes (CgroupPath) and its pods'
// cgroups lie below it, so an agent attaches its programs here.
func (n *Node) CgroupRoot() string { return filepath.Join(n.lab.cgRoot, n.name) }

// CgroupPath returns the cgroup of processes started on the node (agents).
func (n *Node) CgroupPath() string { return filepath.Join(n.CgroupRoot(), "system") }

// PinDir returns a bpffs directory for this node's agent: the stand-in for
// a host's /sys/fs/bpf/warren. The lab removes it on Close.
func (n *Node) PinDir() string { return filepath.Join(n.lab.PinDir(), n.name) }

// Pods returns the node's pods in creation order.
func (n *Node) Pods() []*Pod {
	n.lab.mu.Lock()
	defer n.lab.mu.Unlock()
	return append([]*Pod(nil), n.order...)
}

// Do runs fn on a thread inside the node's network namespace. Sockets fn
// creates stay in that namespace after Do returns.
func (n *Node) Do(fn func() error) error { return inNetNS(n.ns, fn) }

// Start runs a command inside the node's network namespace and cgroup.
func (n *Node) Start(name string, args ...string) (*Process, error) {
	return n.lab.start(n.ns, n.CgroupPath(), n.name, name, args)
}
