package lab

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Pod is a lab pod: a network namespace with eth0 on its node's cni0, an IPv4
// and an IPv6 address from the node's pod CIDRs, default routes via the node,
// and its own cgroup.
type Pod struct {
	node  *Node
	name  string
	index int
	ns    netns.NsHandle
	ipv4  netip.Addr
	ipv6  netip.Addr
}

// AddPod creates a pod on the node. Names follow the node name rules and are
// unique in the whole lab; on a bad or duplicate name nothing changes.
func (n *Node) AddPod(name string) (*Pod, error) {
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("lab: pod name %q must match %s", name, nameRE)
	}
	l := n.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("lab: add pod %s: lab is closed", name)
	}
	for _, other := range l.order {
		if _, ok := other.pods[name]; ok {
			return nil, fmt.Errorf("lab: pod %s already exists on node %s", name, other.name)
		}
	}
	if len(n.order) >= maxPodsPerNode {
		return nil, fmt.Errorf("lab: add pod %s: at most %d pods per node", name, maxPodsPerNode)
	}
	j := len(n.order) + 1
	p := &Pod{
		node:  n,
		name:  name,
		index: j,
		ipv4:  addrAdd(n.podCIDRv4.Addr(), 10+j),
		ipv6:  addrAdd(n.podCIDRv6.Addr(), 10+j),
	}
	if err := p.create(); err != nil {
		p.destroy()
		return nil, fmt.Errorf("lab: add pod %s: %w", name, err)
	}
	n.pods[name] = p
	n.order = append(n.order, p)
	return p, nil
}

func (p *Pod) nsName() string { return p.node.lab.nsName(p.node.name, p.name) }

func (p *Pod) hostVeth() string { return fmt.Sprintf("vp%d", p.index) }

func (p *Pod) create() error {
	var err error
	if err = os.Mkdir(p.CgroupPath(), 0o755); err != nil {
		return fmt.Errorf("create cgroup: %w", err)
	}
	if p.ns, err = newNamedNS(p.nsName()); err != nil {
		return err
	}
	if err := inNetNS(p.ns, func() error { return writeSysctls(noDAD) }); err != nil {
		return err
	}
	nh, err := netlink.NewHandleAt(p.node.ns)
	if err != nil {
		return fmt.Errorf("netlink in node: %w", err)
	}
	defer nh.Close()
	ph, err := netlink.NewHandleAt(p.ns)
	if err != nil {
		return fmt.Errorf("netlink in pod: %w", err)
	}
	defer ph.Close()

	cni0, err := nh.LinkByName("cni0")
	if err != nil {
		return fmt.Errorf("find cni0: %w", err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: p.hostVeth(), MasterIndex: cni0.Attrs().Index},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(int(p.ns)),
	}
	if err := nh.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s: %w", p.hostVeth(), err)
	}
	if err := linkUp(nh, p.hostVeth()); err != nil {
		return err
	}
	for _, name := range []string{"lo", "eth0"} {
		if err := linkUp(ph, name); err != nil {
			return err
		}
	}
	eth0, err := ph.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("find pod eth0: %w", err)
	}
	if err := addAddr(ph, eth0, netip.PrefixFrom(p.ipv4, 24)); err != nil {
		return err
	}
	if err := addAddr(ph, eth0, netip.PrefixFrom(p.ipv6, 64)); err != nil {
		return err
	}
	for _, gw := range []netip.Addr{p.node.GatewayV4(), p.node.GatewayV6()} {
		r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: gw.AsSlice()}
		if err := ph.RouteAdd(r); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	return nil
}

func (p *Pod) destroy() {
	if p.ns.IsOpen() {
		p.ns.Close()
	}
	netns.DeleteNamed(p.nsName())
	if nh, err := netlink.NewHandleAt(p.node.ns); err == nil {
		if link, err := nh.LinkByName(p.hostVeth()); err == nil {
			nh.LinkDel(link)
		}
		nh.Close()
	}
	os.Remove(p.CgroupPath())
}

// Name returns the pod's name.
func (p *Pod) Name() string { return p.name }

// Node returns the pod's node.
func (p *Pod) Node() *Node { return p.node }

// IPv4 returns the pod's IPv4 address.
func (p *Pod) IPv4() netip.Addr { return p.ipv4 }

// IPv6 returns the pod's IPv6 address.
func (p *Pod) IPv6() netip.Addr { return p.ipv6 }

// NetNSPath returns the path of the pod's network namespace.
func (p *Pod) NetNSPath() string { return filepath.Join(netnsDir, p.nsName()) }

// NetNS returns the pod's namespace handle, owned by the lab: do not close it.
func (p *Pod) NetNS() netns.NsHandle { return p.ns }

// CgroupPath returns the pod's cgroup v2 directory.
func (p *Pod) CgroupPath() string { return filepath.Join(p.node.CgroupRoot(), "pods", p.name) }

// Do runs fn on a thread inside the pod's network namespace (but not its
// cgroup: use Start for code that cgroup BPF programs must see as the pod's).
// Sockets fn creates stay in the pod's namespace after Do returns.
func (p *Pod) Do(fn func() error) error { return inNetNS(p.ns, fn) }

// Start runs a command inside the pod's network namespace and cgroup.
func (p *Pod) Start(name string, args ...string) (*Process, error) {
	return p.node.lab.start(p.ns, p.CgroupPath(), p.node.name+"/"+p.name, name, args)
}
