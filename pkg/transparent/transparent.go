// Package transparent sets up, inside an enrolled pod's network namespace,
// what lets the agent connect to the pod's apps from the client's address
// (source address preservation), without iptables or nftables.
//
// The agent dials the app inside the pod from a socket with IP_TRANSPARENT
// (IPV6_TRANSPARENT), bound to the client's address, marked
// loader.TransparentMark. The SYN reaches the app over loopback (the app's
// address is local) carrying that mark. The app's answers go to the client's
// address, which the pod would route out of its default route; three things
// bring them back to the agent's socket instead:
//
//   - net.ipv4.tcp_fwmark_accept=1 (per netns; also governs IPv6): a request
//     socket and the accepted socket take the mark of the SYN that created
//     them, when the listener has none. So the SYN-ACK and every later packet
//     of the app's side carry loader.TransparentMark. Only SYNs from the
//     pod's own sockets can carry a mark (a veth clears it between
//     namespaces), so no other connection changes.
//   - ip rule pref Priority fwmark loader.TransparentMark lookup Table (IPv4
//     and IPv6), and
//   - in Table, local 0.0.0.0/0 dev lo and local ::/0 dev lo: a marked packet
//     is delivered locally, to the agent's socket, which IP_TRANSPARENT lets
//     own a foreign address.
//
// The rules carry a protocol (rtm_protocol) that records whether Setup turned
// tcp_fwmark_accept on, so Teardown restores the sysctl even after an agent
// restart, and Sweep (nodeagent uninstall) finds every namespace to clean.
package transparent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/netnsx"
	"github.com/warren-mesh/warren/pkg/loader"
)

const (
	// Table is the routing table holding the local default routes.
	Table = 1338
	// Priority is the preference of the fwmark rules (before main, 32766).
	Priority = 1338
	// protoSet marks rules installed by a Setup that turned
	// tcp_fwmark_accept on: Teardown turns it off again.
	protoSet = 0xa7
	// protoKept marks rules installed where tcp_fwmark_accept was on already.
	protoKept = 0xa8
)

// sysctlPath is tcp_fwmark_accept, as seen from inside a namespace.
const sysctlPath = "/proc/sys/net/ipv4/tcp_fwmark_accept"

// Options says which families to set up; a pod without IPv6 (or with IPv6
// disabled) only needs IPv4.
type Options struct {
	IPv4, IPv6 bool
}

// Setup installs the rules, routes and sysctl in the namespace ns. It is
// idempotent: an agent restart finds them in place and keeps them. On error
// nothing it added stays.
func Setup(ns netns.NsHandle, o Options) (err error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("transparent setup: netlink in netns: %w", err)
	}
	defer h.Close()
	rules, err := ourRules(h)
	if err != nil {
		return fmt.Errorf("transparent setup: %w", err)
	}
	proto := uint8(protoKept)
	for _, r := range rules {
		proto = r.Protocol // a restart: the first Setup knew the sysctl's value
	}
	if len(rules) == 0 {
		on, err := readSysctl(ns)
		if err != nil {
			return fmt.Errorf("transparent setup: %w", err)
		}
		if !on {
			if err := writeSysctl(ns, true); err != nil {
				return fmt.Errorf("transparent setup: %w", err)
			}
			proto = protoSet
		}
	}
	defer func() {
		if err != nil {
			if terr := teardown(ns, h, proto == protoSet); terr != nil {
				err = errors.Join(err, terr)
			}
		}
	}()
	for _, fam := range families(o) {
		if err := h.RouteReplace(localDefault(fam)); err != nil {
			return fmt.Errorf("transparent setup: add route %s: %w", localDefault(fam), err)
		}
		r := rule(fam, proto)
		if have(rules, fam) {
			continue
		}
		if err := h.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("transparent setup: add rule %s: %w", r, err)
		}
	}
	return nil
}

// Teardown removes what Setup installed in ns and restores
// tcp_fwmark_accept when Setup had turned it on. Nothing installed is not an
// error. The sysctl goes first and the rules last: an interrupted Teardown
// leaves the rules that tell the next one what to restore.
func Teardown(ns netns.NsHandle) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("transparent teardown: netlink in netns: %w", err)
	}
	defer h.Close()
	rules, err := ourRules(h)
	if err != nil {
		return fmt.Errorf("transparent teardown: %w", err)
	}
	reset := false
	for _, r := range rules {
		reset = reset || r.Protocol == protoSet
	}
	if err := teardown(ns, h, reset); err != nil {
		return fmt.Errorf("transparent teardown: %w", err)
	}
	return nil
}

func teardown(ns netns.NsHandle, h *netlink.Handle, resetSysctl bool) error {
	var errs []error
	if resetSysctl {
		errs = append(errs, writeSysctl(ns, false))
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rt := localDefault(fam)
		if err := h.RouteDel(rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EAFNOSUPPORT) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", rt, err))
		}
	}
	rules, err := ourRules(h)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, r := range rules {
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule %s: %w", r.String(), err))
		}
	}
	return errors.Join(errs...)
}

// Installed reports whether ns holds Setup's rules.
func Installed(ns netns.NsHandle) (bool, error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false, fmt.Errorf("netlink in netns: %w", err)
	}
	defer h.Close()
	rules, err := ourRules(h)
	return len(rules) > 0, err
}

// Sweep tears down Setup's rules in the network namespaces whose cookie
// is in cookies, wherever it finds them: those of running processes
// (/proc/<pid>/ns/net) and the named ones (/var/run/netns, /run/netns).
// nodeagent uninstall calls it with the agent's enrolled pods, since the
// agent that installed the rules is gone; namespaces of other agents (other
// pin directories) are left alone. It returns how many it cleaned.
func Sweep(cookies []loader.NetnsCookie) (int, error) {
	want := map[loader.NetnsCookie]bool{}
	for _, c := range cookies {
		want[c] = true
	}
	if len(want) == 0 {
		return 0, nil
	}
	var paths []string
	procs, _ := filepath.Glob("/proc/[0-9]*/ns/net")
	paths = append(paths, procs...)
	for _, dir := range []string{"/var/run/netns", "/run/netns"} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			paths = append(paths, filepath.Join(dir, e.Name()))
		}
	}
	seen := map[uint64]bool{}
	n := 0
	var errs []error
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil || seen[st.Ino] {
			continue // a process that exited, or a namespace already visited
		}
		seen[st.Ino] = true
		c, err := loader.CookieOf(p)
		if err != nil || !want[c] {
			continue
		}
		delete(want, c)
		ns, err := netns.GetFromPath(p)
		if err != nil {
			continue
		}
		if err := Teardown(ns); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p, err))
		} else {
			n++
		}
		ns.Close()
		if len(want) == 0 {
			break
		}
	}
	return n, errors.Join(errs...)
}

func families(o Options) []int {
	var f []int
	if o.IPv4 {
		f = append(f, unix.AF_INET)
	}
	if o.IPv6 {
		f = append(f, unix.AF_INET6)
	}
	return f
}

// localDefault is "local 0.0.0.0/0 dev lo table Table" (or ::/0).
func localDefault(fam int) *netlink.Route {
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if fam == unix.AF_INET6 {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &netlink.Route{
		LinkIndex: 1, // lo is ifindex 1 in every namespace
		Dst:       dst,
		Table:     Table,
		Type:      unix.RTN_LOCAL,
		Scope:     unix.RT_SCOPE_HOST,
		Family:    fam,
	}
}

// rule is "pref Priority fwmark TransparentMark lookup Table proto proto".
func rule(fam int, proto uint8) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = fam
	r.Priority = Priority
	r.Mark = loader.TransparentMark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Table = Table
	r.Protocol = proto
	return r
}

// ourRules lists the rules Setup installs (both families), recognised by
// preference, mark and table.
func ourRules(h *netlink.Handle) ([]netlink.Rule, error) {
	var out []netlink.Rule
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := h.RuleListFiltered(fam, &netlink.Rule{Priority: Priority, Table: Table},
			netlink.RT_FILTER_PRIORITY|netlink.RT_FILTER_TABLE)
		if err != nil {
			if errors.Is(err, unix.EAFNOSUPPORT) {
				continue // IPv6 compiled out
			}
			return nil, fmt.Errorf("list rules: %w", err)
		}
		for _, r := range rs {
			if r.Mark == loader.TransparentMark {
				r.Family = fam
				out = append(out, r)
			}
		}
	}
	return out, nil
}

func have(rules []netlink.Rule, fam int) bool {
	for _, r := range rules {
		if r.Family == fam {
			return true
		}
	}
	return false
}

func readSysctl(ns netns.NsHandle) (on bool, err error) {
	err = netnsx.Do(ns, func() error {
		b, err := os.ReadFile(sysctlPath)
		if err != nil {
			return err
		}
		v, err := strconv.Atoi(strings.TrimSpace(string(b)))
		on = v != 0
		return err
	})
	if err != nil {
		return false, fmt.Errorf("read tcp_fwmark_accept: %w", err)
	}
	return on, nil
}

func writeSysctl(ns netns.NsHandle, on bool) error {
	v := "0"
	if on {
		v = "1"
	}
	// netnsx.WriteSysctl: /proc/sys is read-only in the chart's container.
	err := netnsx.WriteSysctl(ns, "net.ipv4.tcp_fwmark_accept", v)
	if err != nil {
		return fmt.Errorf("set tcp_fwmark_accept=%s: %w", v, err)
	}
	return nil
}

// Socket options of the agent's transparent sockets.
const (
	ipTransparent   = unix.IP_TRANSPARENT   // SOL_IP
	ipv6Transparent = unix.IPV6_TRANSPARENT // SOL_IPV6
)

// Control prepares the socket fd (of family v4 or v6) for a transparent
// connect: IP_TRANSPARENT (or IPV6_TRANSPARENT), which needs CAP_NET_ADMIN,
// and SO_MARK loader.TransparentMark. Bind it to the client's address next.
func Control(fd int, v4 bool) error {
	if v4 {
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, ipTransparent, 1); err != nil {
			return fmt.Errorf("set IP_TRANSPARENT: %w", err)
		}
	} else if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, ipv6Transparent, 1); err != nil {
		return fmt.Errorf("set IPV6_TRANSPARENT: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, loader.TransparentMark); err != nil {
		return fmt.Errorf("set SO_MARK: %w", err)
	}
	return nil
}

// Check verifies that this host can preserve source addresses: the
// tcp_fwmark_accept sysctl exists, IP_TRANSPARENT is permitted (CAP_NET_ADMIN),
// and fwmark rules and a local default route can be installed and removed
// (tried in a throw-away network namespace). It returns what it checked.
func Check() (string, error) {
	if _, err := os.Stat(sysctlPath); err != nil {
		return "", fmt.Errorf("net.ipv4.tcp_fwmark_accept: %w (needs Linux 3.15)", err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("socket: %w", err)
	}
	err = unix.SetsockoptInt(fd, unix.SOL_IP, ipTransparent, 1)
	unix.Close(fd)
	if err != nil {
		return "", fmt.Errorf("IP_TRANSPARENT: %w (needs CAP_NET_ADMIN)", err)
	}
	var detail string
	err = inThrowaway(func(ns netns.NsHandle) error {
		if err := Setup(ns, Options{IPv4: true, IPv6: true}); err != nil {
			return err
		}
		ok, err := Installed(ns)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("fwmark rules not found after adding them (CONFIG_IP_MULTIPLE_TABLES, CONFIG_IPV6_MULTIPLE_TABLES?)")
		}
		detail = fmt.Sprintf("IP_TRANSPARENT, tcp_fwmark_accept, fwmark %#x rules and table %d work (tried in a scratch netns)", loader.TransparentMark, Table)
		return Teardown(ns)
	})
	return detail, err
}

// inThrowaway runs fn with a new, empty network namespace (lo up) that is
// gone when fn returns.
func inThrowaway(fn func(netns.NsHandle) error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: it dies with the goroutine instead
		// of returning to the runtime in the scratch namespace.
		runtime.LockOSThread()
		if err := unix.Unshare(syscall.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare a scratch netns: %w (needs CAP_SYS_ADMIN)", err)
			return
		}
		ns, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			errc <- fmt.Errorf("scratch netns lo: %w", err)
			return
		}
		errc <- fn(ns)
	}()
	return <-errc
}
