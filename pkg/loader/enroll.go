package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/warren-mesh/warren/internal/netnsx"
)

// maxPods is WR_MAX_PODS in bpf/lib/maps.h: slots run from 0 to maxPods-1.
const maxPods = 4096

// NetnsCookie identifies a network namespace for as long as it exists
// (SO_NETNS_COOKIE, bpf_get_netns_cookie); it is never reused while the
// kernel runs. Enrollment is keyed by it.
type NetnsCookie uint64

// EnrollOptions describe the agent's listeners inside one pod's netns.
type EnrollOptions struct {
	// OutboundPort is the port of the agent's loopback listener (127.0.0.1
	// and ::1) in the pod's netns that captured connects are sent to.
	// Default DefaultOutboundPort.
	OutboundPort uint16
	// Inbound is the agent's inbound plaintext listener (15006, e.g. a
	// *net.TCPListener) opened inside the pod's netns. Every TCP SYN that
	// reaches the netns from outside (not loopback, not from the pod's own
	// address, not to the HBONE port, not from ExemptSources) is steered to
	// it; the accepted socket's local address is the original destination.
	// Nil: no inbound capture. The map holds its own reference to the
	// socket, which the kernel drops when the listener closes: a new agent
	// enrolls its new listener before the old one closes.
	Inbound syscall.Conn
	// ExemptSources are source addresses never steered inbound, such as the
	// node's address for kubelet probes.
	ExemptSources []netip.Addr
	// PodIPs are the pod's own addresses: getsockname on a captured
	// connection answers the first of the connection's family (IPv4 or
	// IPv6) instead of the loopback address the connect was redirected
	// from. Without one of a family, getsockname of that family is left
	// alone (counted as sock_no_pod_addr).
	PodIPs []netip.Addr
}

// CookieOf returns the cookie of the network namespace at netnsPath (a
// /proc/<pid>/ns/net or /var/run/netns/<name> file).
func CookieOf(netnsPath string) (NetnsCookie, error) {
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer ns.Close()
	return cookieOfNetns(ns)
}

// cookieOfNetns opens a socket inside ns and reads its SO_NETNS_COOKIE (Linux 5.14).
func cookieOfNetns(ns netns.NsHandle) (NetnsCookie, error) {
	var fd int
	if err := netnsx.Do(ns, func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		return err
	}); err != nil {
		return 0, fmt.Errorf("socket in netns: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_NETNS_COOKIE: %w", err)
	}
	return NetnsCookie(c), nil
}

// Enroll starts capturing the TCP connections of the netns at netnsPath:
// outbound connects go to opts.OutboundPort on loopback, inbound SYNs to
// opts.Inbound. Enrolling again updates the options (idempotent).
func (l *Loader) Enroll(netnsPath string, opts EnrollOptions) (NetnsCookie, error) {
	if opts.OutboundPort == 0 {
		opts.OutboundPort = DefaultOutboundPort
	}
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer ns.Close()
	cookie, err := cookieOfNetns(ns)
	if err != nil {
		return 0, fmt.Errorf("enroll %s: %w", netnsPath, err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.enroll(cookie, int(ns), opts); err != nil {
		return 0, fmt.Errorf("enroll %s: %w", netnsPath, err)
	}
	return cookie, nil
}

func (l *Loader) enroll(cookie NetnsCookie, nsFD int, opts EnrollOptions) error {
	var pod wrPod
	err := l.pods.Lookup(uint64(cookie), &pod)
	switch {
	case err == nil:
	case errors.Is(err, ebpf.ErrKeyNotExist):
		slot, err := l.freeSlot()
		if err != nil {
			return err
		}
		pod.Slot = slot
	default:
		return fmt.Errorf("look up pod: %w", err)
	}
	pod.OutPort = opts.OutboundPort
	ips, err := podIPValue(opts.PodIPs)
	if err != nil {
		return err
	}
	if err := l.podIP.Update(uint64(cookie), ips, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update pod addresses: %w", err)
	}

	if err := l.setExempt(pod.Slot, opts.ExemptSources); err != nil {
		return err
	}
	pin := l.netnsPin(cookie)
	if opts.Inbound == nil {
		if err := l.clearInbound(pod.Slot); err != nil {
			return err
		}
		if err := detachPinned(pin); err != nil {
			return err
		}
	} else {
		if err := l.setInbound(pod.Slot, opts.Inbound); err != nil {
			return err
		}
		if err := l.attachNetns(pin, nsFD, pod.Slot); err != nil {
			return err
		}
	}
	// Last: capture starts once everything it needs is in place.
	if err := l.pods.Update(uint64(cookie), pod, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update pod: %w", err)
	}
	return nil
}

// freeSlot returns the lowest slot no enrolled pod uses.
func (l *Loader) freeSlot() (uint32, error) {
	used := make(map[uint32]bool)
	var (
		k   uint64
		pod wrPod
	)
	it := l.pods.Iterate()
	for it.Next(&k, &pod) {
		used[pod.Slot] = true
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("list pods: %w", err)
	}
	for s := uint32(0); s < maxPods; s++ {
		if !used[s] {
			return s, nil
		}
	}
	return 0, fmt.Errorf("all %d pod slots in use", maxPods)
}

// setExempt makes wr_exempt hold exactly addrs for slot.
func (l *Loader) setExempt(slot uint32, addrs []netip.Addr) error {
	want := make(map[wrExemptKey]bool)
	for _, a := range addrs {
		if !a.IsValid() {
			return errors.New("exempt source: invalid address")
		}
		want[exemptKey(slot, a)] = true
	}
	if err := l.deleteExempt(func(k wrExemptKey) bool { return k.Slot == slot && !want[k] }); err != nil {
		return err
	}
	for k := range want {
		if err := l.exempt.Update(k, uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add exempt source: %w", err)
		}
	}
	return nil
}

func (l *Loader) deleteExempt(match func(wrExemptKey) bool) error {
	return deleteWhere(l.exempt, "exempt source", func(k wrExemptKey, _ uint8) bool { return match(k) })
}

// setInbound puts the listener into wr_inbound at slot.
func (l *Loader) setInbound(slot uint32, c syscall.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("inbound listener: %w", err)
	}
	var uerr error
	if err := rc.Control(func(fd uintptr) {
		proto, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
		switch {
		case err != nil:
			uerr = fmt.Errorf("getsockopt SO_PROTOCOL: %w", err)
		case proto != unix.IPPROTO_TCP:
			// Go >= 1.24 listens with MPTCP by default.
			uerr = fmt.Errorf("inbound listener has protocol %d, not TCP (use net.ListenConfig with SetMultipathTCP(false))", proto)
		default:
			uerr = l.inbound.Update(slot, uint64(fd), ebpf.UpdateAny)
		}
	}); err != nil {
		return fmt.Errorf("inbound listener: %w", err)
	}
	if uerr != nil {
		return fmt.Errorf("add inbound listener: %w", uerr)
	}
	return nil
}

// clearInbound empties slot in wr_inbound. A sockmap answers EINVAL, not
// ENOENT, for an empty slot.
func (l *Loader) clearInbound(slot uint32) error {
	err := l.inbound.Delete(slot)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clear inbound listener: %w", err)
	}
	return nil
}

func (l *Loader) netnsPin(c NetnsCookie) string {
	return filepath.Join(l.cfg.PinDir, pinNetnsDir, strconv.FormatUint(uint64(c), 10))
}

// loadSkLookup loads an sk_lookup program instance for one slot.
func (l *Loader) loadSkLookup(slot uint32) (*ebpf.Program, error) {
	spec := l.skSpec.Copy()
	if err := spec.Variables["wr_cfg_slot"].Set(slot); err != nil {
		return nil, fmt.Errorf("set slot: %w", err)
	}
	if err := spec.Variables["wr_cfg_hbone_port"].Set(uint32(l.cfg.HBONEPort)); err != nil {
		return nil, fmt.Errorf("set hbone port: %w", err)
	}
	var objs struct {
		Prog *ebpf.Program `ebpf:"wr_sk_lookup"`
	}
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: l.cfg.PinDir}}); err != nil {
		return nil, fmt.Errorf("load sk_lookup program: %w", err)
	}
	return objs.Prog, nil
}

// attachNetns attaches (or updates) the netns's pinned sk_lookup link.
func (l *Loader) attachNetns(pin string, nsFD int, slot uint32) error {
	prog, err := l.loadSkLookup(slot)
	if err != nil {
		return err
	}
	defer prog.Close()
	lk, err := link.LoadPinnedLink(pin, nil)
	if err == nil {
		defer lk.Close()
		if err := lk.Update(prog); err != nil {
			return fmt.Errorf("update sk_lookup link: %w", err)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	nl, err := link.AttachNetNs(nsFD, prog)
	if err != nil {
		return fmt.Errorf("attach sk_lookup: %w", err)
	}
	defer nl.Close()
	if err := nl.Pin(pin); err != nil {
		return fmt.Errorf("pin sk_lookup link: %w", err)
	}
	return nil
}

// updateNetnsLinks gives every pinned sk_lookup link the current program
// (at Open); links of pods no longer enrolled are removed.
func (l *Loader) updateNetnsLinks() error {
	dir := filepath.Join(l.cfg.PinDir, pinNetnsDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list netns links: %w", err)
	}
	for _, e := range ents {
		pin := filepath.Join(dir, e.Name())
		c, err := strconv.ParseUint(e.Name(), 10, 64)
		var pod wrPod
		if err == nil {
			err = l.pods.Lookup(c, &pod)
		}
		if err != nil {
			// Not a pod we know: a leftover of an interrupted Unenroll.
			if err := detachPinned(pin); err != nil {
				return err
			}
			continue
		}
		if err := l.attachNetns(pin, -1, pod.Slot); err != nil {
			if !errors.Is(err, unix.ENOLINK) {
				return err
			}
			// The netns is gone (the link is defunct): the pod was deleted
			// while no agent ran. Forget it.
			if err := l.unenroll(NetnsCookie(c)); err != nil {
				return err
			}
		}
	}
	return nil
}

// Unenroll stops capturing the netns with cookie c and removes every trace of
// it: enrollment, inbound listener, exempt sources, sk_lookup link, and the
// original destinations of its connections (established and in flight). Unenrolling a netns that is not
// enrolled (or no longer exists) is not an error.
func (l *Loader) Unenroll(c NetnsCookie) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.unenroll(c)
}

func (l *Loader) unenroll(c NetnsCookie) error {
	var pod wrPod
	err := l.pods.Lookup(uint64(c), &pod)
	havePod := err == nil
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unenroll %d: look up pod: %w", c, err)
	}
	if havePod {
		if err := l.pods.Delete(uint64(c)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("unenroll %d: delete pod: %w", c, err)
		}
	}
	if err := detachPinned(l.netnsPin(c)); err != nil {
		return fmt.Errorf("unenroll %d: %w", c, err)
	}
	if havePod {
		if err := l.clearInbound(pod.Slot); err != nil {
			return fmt.Errorf("unenroll %d: %w", c, err)
		}
		if err := l.deleteExempt(func(k wrExemptKey) bool { return k.Slot == pod.Slot }); err != nil {
			return fmt.Errorf("unenroll %d: %w", c, err)
		}
		if err := deleteWhere(l.tpass, "transparent connect", func(k wrTpKey, _ uint8) bool { return k.Slot == pod.Slot }); err != nil {
			return fmt.Errorf("unenroll %d: %w", c, err)
		}
	}
	if err := l.podIP.Delete(uint64(c)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unenroll %d: delete pod addresses: %w", c, err)
	}
	if err := l.deleteOrig(uint64(c)); err != nil {
		return fmt.Errorf("unenroll %d: %w", c, err)
	}
	if err := l.deletePending(uint64(c)); err != nil {
		return fmt.Errorf("unenroll %d: %w", c, err)
	}
	return nil
}

// deletePending removes the in-flight captured connects of netns.
func (l *Loader) deletePending(netns uint64) error {
	return deleteWhere(l.pending, "pending connect", func(_ uint64, v wrPend) bool { return v.Netns == netns })
}

// deleteOrig removes the original destinations recorded in netns.
func (l *Loader) deleteOrig(netns uint64) error {
	return deleteWhere(l.orig, "original destination", func(k wrTuple, _ wrDst) bool { return k.Netns == netns })
}

// deleteWhere deletes the entries of m that match. Keys are collected first:
// deleting while iterating a hash map can restart or skip the iteration.
func deleteWhere[K, V any](m *ebpf.Map, what string, match func(K, V) bool) error {
	var (
		k     K
		v     V
		stale []K
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if match(k, v) {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list %ss: %w", what, err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete %s: %w", what, err)
		}
	}
	return nil
}

// Enrolled lists the cookies of the enrolled network namespaces, for an agent
// that restarts to reconcile with the pods it knows (and Unenroll the rest).
func (l *Loader) Enrolled() ([]NetnsCookie, error) {
	var (
		k    uint64
		pod  wrPod
		list []NetnsCookie
	)
	it := l.pods.Iterate()
	for it.Next(&k, &pod) {
		list = append(list, NetnsCookie(k))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	return list, nil
}

// PinnedEnrolled lists the network namespaces enrolled under pinDir without
// opening the loader (nodeagent uninstall, before Uninstall removes the
// map). A missing pin directory or map lists none.
func PinnedEnrolled(pinDir string) ([]NetnsCookie, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "wr_pods"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load pinned wr_pods: %w", err)
	}
	defer m.Close()
	var (
		k    uint64
		pod  wrPod
		list []NetnsCookie
	)
	it := m.Iterate()
	for it.Next(&k, &pod) {
		list = append(list, NetnsCookie(k))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list pinned pods: %w", err)
	}
	return list, nil
}
