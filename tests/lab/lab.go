package lab

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/bpffs"
	"github.com/warren-mesh/warren/internal/cgroup2"
)

// Allowed address ranges: the IPv4 and IPv6 benchmarking blocks (RFC 2544, RFC 5180).
var (
	AllowedV4 = netip.MustParsePrefix("198.18.0.0/15")
	AllowedV6 = netip.MustParsePrefix("2001:2::/48")
)

// Default address plan; see the package documentation.
var (
	DefaultUnderlayV4 = netip.MustParsePrefix("198.18.0.0/24")
	DefaultUnderlayV6 = netip.MustParsePrefix("2001:2::/64")
	DefaultPodsV4     = netip.MustParsePrefix("198.19.0.0/16")
	DefaultPodsV6     = netip.MustParsePrefix("2001:2:0:100::/56")
)

const (
	// PrefixPattern matches the run prefixes that labs use, and nothing else on a host.
	prefixPattern  = `^wl[a-z0-9]{6}$`
	maxNodes       = 200
	maxPodsPerNode = 200
	// cgroupDir is the lab's directory under the cgroup2 mount.
	cgroupDir = "warren-lab"
	lockDir   = "/run/warren-lab"
)

var (
	prefixRE = regexp.MustCompile(prefixPattern)
	nameRE   = regexp.MustCompile(`^[a-z][a-z0-9]{0,11}$`)
)

// Config sets a lab's prefix and address plan. The zero value uses a random
// prefix and the default plan.
type Config struct {
	// Prefix names every namespace and cgroup of the run: "wl" and six
	// lowercase letters or digits. Empty means random.
	Prefix string
	// UnderlayV4 and UnderlayV6 hold the nodes' addresses.
	UnderlayV4, UnderlayV6 netip.Prefix
	// PodsV4 (/16 or larger) and PodsV6 (/56 or larger) are split into one
	// /24 and one /64 per node.
	PodsV4, PodsV6 netip.Prefix
}

// Lab is a running virtual cluster. Its methods are safe for concurrent use.
type Lab struct {
	cfg      Config
	prefix   string
	lock     *os.File
	cgRoot   string // <cgroup2>/warren-lab/<prefix>
	underlay netns.NsHandle

	mu     sync.Mutex
	nodes  map[string]*Node
	order  []*Node
	procs  map[int]*Process
	closed bool
}

// New validates cfg, removes leftovers of crashed runs, and creates the
// underlay. The caller must Close the lab.
func New(cfg Config) (*Lab, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("lab: needs root (network namespaces and cgroups)")
	}
	if err := CleanStale(); err != nil {
		return nil, fmt.Errorf("lab: remove stale runs: %w", err)
	}
	cgMount, err := cgroup2.Mount()
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if err := bpffs.EnsureMounted(bpffsRoot); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	l := &Lab{
		cfg:    cfg,
		prefix: cfg.Prefix,
		cgRoot: filepath.Join(cgMount, cgroupDir, cfg.Prefix),
		nodes:  map[string]*Node{},
		procs:  map[int]*Process{},
	}
	if l.lock, err = acquireLock(cfg.Prefix); err != nil {
		return nil, err
	}
	if err := l.create(); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

func (cfg *Config) fill() error {
	if cfg.Prefix == "" {
		cfg.Prefix = randomPrefix()
	}
	if !prefixRE.MatchString(cfg.Prefix) {
		return fmt.Errorf("lab: prefix %q must match %s", cfg.Prefix, prefixPattern)
	}
	def := func(p *netip.Prefix, d netip.Prefix) {
		if !p.IsValid() {
			*p = d
		}
	}
	def(&cfg.UnderlayV4, DefaultUnderlayV4)
	def(&cfg.UnderlayV6, DefaultUnderlayV6)
	def(&cfg.PodsV4, DefaultPodsV4)
	def(&cfg.PodsV6, DefaultPodsV6)
	checks := []struct {
		name    string
		p       netip.Prefix
		allowed netip.Prefix
		maxBits int
	}{
		{"UnderlayV4", cfg.UnderlayV4, AllowedV4, 24},
		{"UnderlayV6", cfg.UnderlayV6, AllowedV6, 64},
		{"PodsV4", cfg.PodsV4, AllowedV4, 16},
		{"PodsV6", cfg.PodsV6, AllowedV6, 56},
	}
	for _, c := range checks {
		if err := within(c.p, c.allowed); err != nil {
			return fmt.Errorf("lab: %s: %w", c.name, err)
		}
		if c.p.Bits() > c.maxBits {
			return fmt.Errorf("lab: %s %s is too small: need /%d or larger", c.name, c.p, c.maxBits)
		}
	}
	if cfg.UnderlayV4.Overlaps(cfg.PodsV4) || cfg.UnderlayV6.Overlaps(cfg.PodsV6) {
		return fmt.Errorf("lab: underlay %s/%s overlaps pod ranges %s/%s", cfg.UnderlayV4, cfg.UnderlayV6, cfg.PodsV4, cfg.PodsV6)
	}
	return nil
}

// within reports an error unless p lies inside allowed.
func within(p, allowed netip.Prefix) error {
	if !p.IsValid() || p.Addr().Is4() != allowed.Addr().Is4() || p.Bits() < allowed.Bits() || !allowed.Contains(p.Addr()) {
		return fmt.Errorf("%s is outside %s: the lab only uses 198.18.0.0/15 and 2001:2::/48", p, allowed)
	}
	return nil
}

func randomPrefix() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "wl" + string(b)
}

// Prefix returns the run's prefix.
func (l *Lab) Prefix() string { return l.prefix }

// CgroupPath returns the run's cgroup v2 directory; every node's cgroup lies
// below it, so BPF programs attached here see the whole lab.
func (l *Lab) CgroupPath() string { return l.cgRoot }

// PinDir returns a bpffs directory reserved for this run (created on first
// use by its user, removed by Close and by stale cleanup).
func (l *Lab) PinDir() string { return filepath.Join(bpffsRoot, cgroupDir, l.prefix) }

func (l *Lab) nsName(parts ...string) string {
	name := l.prefix
	for _, p := range parts {
		name += "-" + p
	}
	return name
}

func (l *Lab) create() error {
	if err := os.MkdirAll(l.cgRoot, 0o755); err != nil {
		return fmt.Errorf("lab: create cgroup %s: %w", l.cgRoot, err)
	}
	ul, err := newNamedNS(l.nsName("ul"))
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	l.underlay = ul
	if err := inNetNS(ul, func() error { return writeSysctls(noDAD) }); err != nil {
		return fmt.Errorf("lab: underlay: %w", err)
	}
	h, err := netlink.NewHandleAt(ul)
	if err != nil {
		return fmt.Errorf("lab: netlink in underlay: %w", err)
	}
	defer h.Close()
	if err := linkUp(h, "lo"); err != nil {
		return fmt.Errorf("lab: underlay: %w", err)
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := h.LinkAdd(br); err != nil {
		return fmt.Errorf("lab: add underlay bridge: %w", err)
	}
	if err := linkUp(h, "br0"); err != nil {
		return fmt.Errorf("lab: underlay: %w", err)
	}
	return nil
}

// Nodes returns the lab's nodes in creation order.
func (l *Lab) Nodes() []*Node {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Node(nil), l.order...)
}

// Node returns the named node, or nil.
func (l *Lab) Node(name string) *Node {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.nodes[name]
}

// Close stops every process the lab started, then removes its namespaces,
// cgroups, pins and lock. It is safe to call more than once; it returns the
// first error but always attempts every removal.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	procs := make([]*Process, 0, len(l.procs))
	for _, p := range l.procs {
		procs = append(procs, p)
	}
	l.mu.Unlock()

	var errs []error
	for _, p := range procs {
		if err := p.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range l.order {
		for _, p := range n.pods {
			p.ns.Close()
		}
		n.ns.Close()
	}
	if l.underlay.IsOpen() {
		l.underlay.Close()
	}
	if err := removeRun(l.prefix); err != nil {
		errs = append(errs, err)
	}
	if l.lock != nil {
		os.Remove(l.lock.Name())
		l.lock.Close()
	}
	return errors.Join(errs...)
}

func linkUp(h *netlink.Handle, name string) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// addAddr adds an address without duplicate address detection, so IPv6 is
// usable at once instead of after the DAD delay.
func addAddr(h *netlink.Handle, link netlink.Link, p netip.Prefix) error {
	addr := &netlink.Addr{IPNet: prefixToIPNet(p), Flags: unix.IFA_F_NODAD}
	if err := h.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("add %s to %s: %w", p, link.Attrs().Name, err)
	}
	return nil
}

func sortedNames[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}
