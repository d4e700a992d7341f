package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/warren-mesh/warren/internal/cgroup2"
)

// Mark is the SO_MARK of the agent's own sockets. Capture never touches a
// socket that carries it, so the agent's upstream connections (HBONE to
// 15008, plain TCP to the app or to unmeshed destinations) leave as they are.
const Mark = 0x539

// TransparentMark is the SO_MARK of the agent's transparent sockets: its
// connects to an app inside the pod from the client's address (source
// preservation). Capture skips them like Mark; sk_lookup lets their SYNs
// reach the app (sockops records each connect from connect to ESTABLISHED);
// and, with tcp_fwmark_accept, the app's side of the connection inherits the
// mark, which pkg/transparent's policy routing sends back to the agent.
const TransparentMark = 0x53a

// Default ports of the agent's listeners inside each enrolled netns, as
// Istio's ztunnel uses them. This is their one definition: pkg/ztunnel
// listens on them (the HBONE port through Loader.HBONEPort).
const (
	DefaultOutboundPort = 15001
	DefaultInboundPort  = 15006
	DefaultHBONEPort    = 15008
)

// DefaultPinDir is where the BPF objects are pinned unless Config.PinDir says otherwise.
const DefaultPinDir = "/sys/fs/bpf/warren"

// Names of the pinned objects under the pin directory. Maps are pinned under
// their own names (wr_pods, wr_orig, ...); bpftool map dump pinned <dir>/<map>.
const (
	pinConnect4   = "link_connect4"
	pinConnect6   = "link_connect6"
	pinSockops    = "link_sockops"
	pinGetsockopt = "link_getsockopt"
	pinGetpeer4   = "link_getpeername4"
	pinGetpeer6   = "link_getpeername6"
	pinGetsock4   = "link_getsockname4"
	pinGetsock6   = "link_getsockname6"
	pinNetnsDir   = "netns" // one sk_lookup link per enrolled netns, named by its cookie
)

// mapNames lists every map the objects pin.
func mapNames() []string {
	return []string{"wr_pods", "wr_pending", "wr_orig", "wr_exc_port", "wr_exc_cidr", "wr_inbound", "wr_exempt", "wr_stats", "wr_pod_ip", "wr_tpass"}
}

// Config tells Open where to attach and pin, and what never to capture.
type Config struct {
	// CgroupPath is the cgroup2 directory the connect and sockops programs
	// attach to; they see every socket of every process below it.
	// Default: the root of the host's cgroup2 mount.
	CgroupPath string
	// PinDir is the bpffs directory holding every link and map.
	// Default DefaultPinDir. When its parent is not on a bpffs, Open mounts
	// one there (as Cilium does for /sys/fs/bpf).
	PinDir string
	// ExcludePorts are destination ports never captured outbound.
	ExcludePorts []uint16
	// ExcludeCIDRs are destination prefixes never captured outbound.
	ExcludeCIDRs []netip.Prefix
	// HBONEPort is the inbound port sk_lookup never steers. Default DefaultHBONEPort.
	HBONEPort uint16
}

func (c Config) withDefaults() (Config, error) {
	if c.CgroupPath == "" {
		mnt, err := cgroup2.Mount()
		if err != nil {
			return c, err
		}
		c.CgroupPath = mnt
	}
	if c.PinDir == "" {
		c.PinDir = DefaultPinDir
	}
	if c.HBONEPort == 0 {
		c.HBONEPort = DefaultHBONEPort
	}
	return c, nil
}

// Loader owns warren's BPF maps and the links that attach its programs. It
// is safe for concurrent use.
type Loader struct {
	cfg    Config
	cgroup uint64

	pods, pending, orig, excPort, excCIDR, inbound, exempt, stats *ebpf.Map
	podIP, tpass                                                  *ebpf.Map
	links                                                         []link.Link

	skSpec *ebpf.CollectionSpec

	mu sync.Mutex // serialises Enroll/Unenroll (slot allocation, netns links)
}

// Open loads the programs, creates or reuses the pinned maps, and attaches
// connect4, connect6, sockops and getsockopt at cfg.CgroupPath as pinned
// bpf_links. When links are already pinned (a previous agent), their
// programs are replaced atomically with link.Update and the maps are reused,
// so capture never lapses across a restart; the sk_lookup links of enrolled
// namespaces are updated the same way. Close releases the file descriptors
// but keeps everything pinned and attached; Uninstall removes it. Run one
// Open at a time per pin directory (one agent per node).
func Open(cfg Config) (_ *Loader, err error) {
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := Probe(); err != nil {
		return nil, err
	}
	if err := ensureBPFFS(cfg.PinDir); err != nil {
		return nil, err
	}
	cgID, err := cgroup2.ID(cfg.CgroupPath)
	if err != nil {
		return nil, err
	}
	l := &Loader{cfg: cfg, cgroup: cgID}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	pinOpts := ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: cfg.PinDir}}

	connSpec, err := loadConnect()
	if err != nil {
		return nil, fmt.Errorf("load connect spec: %w", err)
	}
	if err := connSpec.Variables["wr_cfg_mark"].Set(uint32(Mark)); err != nil {
		return nil, fmt.Errorf("set mark: %w", err)
	}
	if err := connSpec.Variables["wr_cfg_tmark"].Set(uint32(TransparentMark)); err != nil {
		return nil, fmt.Errorf("set transparent mark: %w", err)
	}
	if err := replaceStaleStats(cfg.PinDir, connSpec.Maps["wr_stats"]); err != nil {
		return nil, err
	}
	if len(cfg.ExcludeCIDRs) > 0 {
		if err := connSpec.Variables["wr_cfg_cidrs"].Set(uint32(1)); err != nil {
			return nil, fmt.Errorf("set cidrs: %w", err)
		}
	}
	var conn connectObjects
	if err := connSpec.LoadAndAssign(&conn, &pinOpts); err != nil {
		return nil, fmt.Errorf("load connect programs: %w", err)
	}
	defer conn.connectPrograms.Close()
	l.pods, l.pending, l.orig = conn.WrPods, conn.WrPending, conn.WrOrig
	l.excPort, l.excCIDR = conn.WrExcPort, conn.WrExcCidr
	l.inbound, l.exempt, l.stats = conn.WrInbound, conn.WrExempt, conn.WrStats
	l.podIP, l.tpass = conn.WrPodIp, conn.WrTpass

	opsSpec, err := loadSockops()
	if err != nil {
		return nil, fmt.Errorf("load sockops spec: %w", err)
	}
	if err := opsSpec.Variables["wr_cfg_tmark"].Set(uint32(TransparentMark)); err != nil {
		return nil, fmt.Errorf("set transparent mark: %w", err)
	}
	var ops sockopsObjects
	if err := opsSpec.LoadAndAssign(&ops, &pinOpts); err != nil {
		return nil, fmt.Errorf("load sockops program: %w", err)
	}
	defer ops.Close()

	var gpn getpeernameObjects
	if err := loadGetpeernameObjects(&gpn, &pinOpts); err != nil {
		return nil, fmt.Errorf("load getpeername programs: %w", err)
	}
	defer gpn.Close()
	var gsn getsocknameObjects
	if err := loadGetsocknameObjects(&gsn, &pinOpts); err != nil {
		return nil, fmt.Errorf("load getsockname programs: %w", err)
	}
	defer gsn.Close()

	var gso getsockoptObjects
	if err := loadGetsockoptObjects(&gso, &pinOpts); err != nil {
		return nil, fmt.Errorf("load getsockopt program: %w", err)
	}
	defer gso.Close()

	l.skSpec, err = loadSklookup()
	if err != nil {
		return nil, fmt.Errorf("load sk_lookup spec: %w", err)
	}

	if err := l.syncExclusions(); err != nil {
		return nil, err
	}

	for _, a := range []struct {
		pin    string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{pinConnect4, conn.WrConnect4, ebpf.AttachCGroupInet4Connect},
		{pinConnect6, conn.WrConnect6, ebpf.AttachCGroupInet6Connect},
		{pinSockops, ops.WrSockops, ebpf.AttachCGroupSockOps},
		{pinGetsockopt, gso.WrGetsockopt, ebpf.AttachCGroupGetsockopt},
		{pinGetpeer4, gpn.WrGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{pinGetpeer6, gpn.WrGetpeername6, ebpf.AttachCgroupInet6GetPeername},
		{pinGetsock4, gsn.WrGetsockname4, ebpf.AttachCgroupInet4GetSockname},
		{pinGetsock6, gsn.WrGetsockname6, ebpf.AttachCgroupInet6GetSockname},
	} {
		lk, err := l.attachCgroup(a.pin, a.prog, a.attach)
		if err != nil {
			return nil, err
		}
		l.links = append(l.links, lk)
	}
	if err := l.updateNetnsLinks(); err != nil {
		return nil, err
	}
	return l, nil
}

// attachCgroup updates the pinned link at pin to prog, or attaches prog at
// the cgroup and pins the new link.
func (l *Loader) attachCgroup(pin string, prog *ebpf.Program, attach ebpf.AttachType) (link.Link, error) {
	path := filepath.Join(l.cfg.PinDir, pin)
	lk, err := link.LoadPinnedLink(path, nil)
	switch {
	case err == nil:
		info, err := lk.Info()
		if err != nil {
			lk.Close()
			return nil, fmt.Errorf("inspect link %s: %w", path, err)
		}
		if cg := info.Cgroup(); cg == nil || cg.CgroupId != l.cgroup {
			lk.Close()
			return nil, fmt.Errorf("link %s is attached to another cgroup than %s: uninstall first", path, l.cfg.CgroupPath)
		}
		if err := lk.Update(prog); err != nil {
			lk.Close()
			return nil, fmt.Errorf("update link %s: %w", path, err)
		}
		return lk, nil
	case errors.Is(err, os.ErrNotExist):
	default:
		return nil, fmt.Errorf("load pinned link %s: %w", path, err)
	}
	cg, err := os.Open(l.cfg.CgroupPath)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	defer cg.Close()
	// A raw bpf_link (never the legacy PROG_ATTACH fallback): only links pin.
	lk, err = link.AttachRawLink(link.RawLinkOptions{Target: int(cg.Fd()), Program: prog, Attach: attach})
	if err != nil {
		return nil, fmt.Errorf("attach %s at %s: %w", attach, l.cfg.CgroupPath, err)
	}
	if err := lk.Pin(path); err != nil {
		lk.Close()
		return nil, fmt.Errorf("pin link %s: %w", path, err)
	}
	return lk, nil
}

// Close releases the loader's file descriptors. Programs stay attached and
// maps stay pinned: capture goes on until the next Open or Uninstall.
func (l *Loader) Close() error {
	var errs []error
	for _, lk := range l.links {
		errs = append(errs, lk.Close())
	}
	l.links = nil
	for _, m := range []*ebpf.Map{l.pods, l.pending, l.orig, l.excPort, l.excCIDR, l.inbound, l.exempt, l.stats, l.podIP, l.tpass} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}

// PinDir returns the bpffs directory the loader pins under.
func (l *Loader) PinDir() string { return l.cfg.PinDir }

// HBONEPort returns the port sk_lookup never steers (Config.HBONEPort after
// defaults): the proxy's HBONE listeners take it from here, so the two
// cannot disagree.
func (l *Loader) HBONEPort() uint16 { return l.cfg.HBONEPort }

// Uninstall detaches every link pinned under pinDir (even if another
// process still holds it open), removes every pin and the directory. A
// missing directory is not an error.
func Uninstall(pinDir string) error {
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	pins := []string{
		filepath.Join(pinDir, pinConnect4),
		filepath.Join(pinDir, pinConnect6),
		filepath.Join(pinDir, pinSockops),
		filepath.Join(pinDir, pinGetsockopt),
		filepath.Join(pinDir, pinGetpeer4),
		filepath.Join(pinDir, pinGetpeer6),
		filepath.Join(pinDir, pinGetsock4),
		filepath.Join(pinDir, pinGetsock6),
	}
	ents, err := os.ReadDir(filepath.Join(pinDir, pinNetnsDir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("list netns links: %w", err))
	}
	for _, e := range ents {
		pins = append(pins, filepath.Join(pinDir, pinNetnsDir, e.Name()))
	}
	for _, p := range pins {
		errs = append(errs, detachPinned(p))
	}
	if err := os.RemoveAll(pinDir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", pinDir, err))
	}
	return errors.Join(errs...)
}

// replaceStaleStats unpins a wr_stats map whose layout is not spec's (pinned
// by a version with fewer counters), so that Open creates the new one
// instead of failing with ErrMapIncompatible: counters are the one map
// whose contents may be lost on upgrade. Programs of the running version
// keep the old map until Open replaces them.
func replaceStaleStats(pinDir string, spec *ebpf.MapSpec) error {
	path := filepath.Join(pinDir, spec.Name)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load pinned %s: %w", spec.Name, err)
	}
	defer m.Close()
	if m.ValueSize() == spec.ValueSize && m.Type() == spec.Type {
		return nil
	}
	if err := m.Unpin(); err != nil {
		return fmt.Errorf("replace %s of an older layout: %w", spec.Name, err)
	}
	return nil
}

// detachPinned detaches and unpins the link pinned at path, if any.
func detachPinned(path string) error {
	lk, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load pinned link %s: %w", path, err)
	}
	defer lk.Close()
	if err := lk.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("detach %s: %w", path, err)
	}
	if err := lk.Unpin(); err != nil {
		return fmt.Errorf("unpin %s: %w", path, err)
	}
	return nil
}
