package loader

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// ErrMissingFeature is wrapped by Probe's error when the kernel lacks something warren needs.
var ErrMissingFeature = errors.New("kernel feature missing")

// feature is one kernel capability warren depends on and the Linux version
// that introduced it (upstream; distributions may backport).
type feature struct {
	name  string
	since string
	probe func() error
}

func helper(pt ebpf.ProgramType, fn asm.BuiltinFunc) func() error {
	return func() error { return features.HaveProgramHelper(pt, fn) }
}

// requiredFeatures lists what the programs and the loader use. The highest
// "since" is the kernel floor: 5.15.
func requiredFeatures() []feature {
	return []feature{
		{"cgroup/connect4|6 programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)", "4.17", func() error { return features.HaveProgramType(ebpf.CGroupSockAddr) }},
		{"cgroup/getpeername4|6 and getsockname4|6 attach types", "5.8", probeGetpeername},
		{"cgroup/getsockopt programs", "5.3", func() error { return features.HaveProgramType(ebpf.CGroupSockopt) }},
		{"bpf_get_netns_cookie in cgroup/getsockopt", "5.8", helper(ebpf.CGroupSockopt, asm.FnGetNetnsCookie)},
		{"sockops programs", "4.13", func() error { return features.HaveProgramType(ebpf.SockOps) }},
		{"sk_lookup programs", "5.9", func() error { return features.HaveProgramType(ebpf.SkLookup) }},
		{"LRU hash maps", "4.10", func() error { return features.HaveMapType(ebpf.LRUHash) }},
		{"LPM trie maps", "4.11", func() error { return features.HaveMapType(ebpf.LPMTrie) }},
		{"sockmap", "4.14", func() error { return features.HaveMapType(ebpf.SockMap) }},
		{"bpf_get_netns_cookie in cgroup/connect", "5.7", helper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)},
		{"bpf_get_socket_cookie in cgroup/connect", "4.19", helper(ebpf.CGroupSockAddr, asm.FnGetSocketCookie)},
		{"bpf_get_socket_cookie in sockops", "4.19", helper(ebpf.SockOps, asm.FnGetSocketCookie)},
		{"bpf_get_netns_cookie in sockops", "5.15", helper(ebpf.SockOps, asm.FnGetNetnsCookie)},
		{"bpf_sk_assign in sk_lookup", "5.9", helper(ebpf.SkLookup, asm.FnSkAssign)},
		{"SO_NETNS_COOKIE socket option", "5.14", probeNetnsCookieOpt},
	}
}

// probeGetpeername loads a cgroup/getpeername4 program (the attach type is
// checked at load for sock_addr programs; 5.8).
func probeGetpeername() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCgroupInet4GetPeername,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
	})
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.E2BIG) {
		return ebpf.ErrNotSupported
	}
	if err != nil {
		return err
	}
	return prog.Close()
}

func probeNetnsCookieOpt() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if _, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE); err != nil {
		if errors.Is(err, unix.ENOPROTOOPT) {
			return ebpf.ErrNotSupported
		}
		return err
	}
	return nil
}

// Probe checks that the running kernel has every feature warren's capture
// needs. A missing feature gives an error that wraps ErrMissingFeature and
// names the feature and the Linux version that brought it. Cgroup bpf_link
// (5.7) and link update are checked when Open attaches.
func Probe() error {
	return probeAll(requiredFeatures())
}

func probeAll(fs []feature) error {
	var errs []error
	for _, f := range fs {
		err := f.probe()
		switch {
		case err == nil:
		case errors.Is(err, ebpf.ErrNotSupported):
			errs = append(errs, fmt.Errorf("%w: %s (needs Linux %s or later)", ErrMissingFeature, f.name, f.since))
		default:
			errs = append(errs, fmt.Errorf("probe %s: %w", f.name, err))
		}
	}
	return errors.Join(errs...)
}
