package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/warren-mesh/warren/internal/bpffs"
	"github.com/warren-mesh/warren/pkg/loader"
	"github.com/warren-mesh/warren/pkg/transparent"
)

// check is one preflight check: what it looked at and, when it fails, how to
// fix it (an error with a Fix method says better, knowing the details).
type check struct {
	name string
	run  func() (detail string, err error)
	fix  string
}

// fixer is an error that knows how to fix its cause.
type fixer interface{ Fix() string }

func newDoctorCmd() *cobra.Command {
	var pinDir string
	var ports []string
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check that this host can run the agent: kernel features, cgroup2, bpffs, capabilities, ports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			return runChecks(cmd.OutOrStdout(), doctorChecks(pinDir, ports))
		},
	}
	cmd.Flags().StringVar(&pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory the agent pins under")
	cmd.Flags().StringSliceVar(&ports, "ports", []string{":15020", ":15021", "127.0.0.1:15000"}, "addresses the agent's metrics, readiness and admin servers bind")
	documentEnv(cmd.Flags())
	return cmd
}

// Capability bits from linux/capability.h.
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capBPF      = 39
	capPerfmon  = 38
)

func doctorChecks(pinDir string, ports []string) []check {
	checks := []check{
		// First: under `ip netns exec` the cgroup2 and bpffs checks fail for a
		// reason they cannot see.
		{"not under ip netns exec", checkNotIPNetnsExec,
			"start the agent with nsenter --net=/var/run/netns/<name> nodeagent run ..., not ip netns exec <name>"},
		{"kernel BPF features", func() (string, error) { return "all present", loader.Probe() },
			"upgrade to Linux 5.15 or later with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and BTF (CONFIG_DEBUG_INFO_BTF)"},
		{"cgroup v2 mount (host root)", checkHostCgroupRoot,
			"boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or mount it: mount -t cgroup2 none /sys/fs/cgroup; in a container the agent needs hostPID, CAP_SYS_ADMIN and CAP_SYS_PTRACE to mount it from the host's cgroup namespace"},
		{"mount propagation", checkMountPropagation(pinDir),
			"make the node's mounts shared, as systemd does at boot (mount --make-rshared /), so HostToContainer volumes (/var/run/netns, /sys/fs/bpf) receive the host's new mounts; see charts/warren/README.md"},
		{"bpffs for pins", func() (string, error) {
			root := bpffs.DefaultRoot
			if strings.HasPrefix(pinDir, root+"/") || pinDir == root {
				ok, err := bpffs.IsMounted(root)
				if err != nil {
					return "", err
				}
				if !ok {
					return "", fmt.Errorf("%s is not a bpffs (the agent mounts one there at start if it may)", root)
				}
				return root + " is bpffs", nil
			}
			return "custom pin dir " + pinDir + ": checked at start", nil
		}, "mount -t bpf bpf /sys/fs/bpf (in Kubernetes: a hostPath volume of /sys/fs/bpf with mountPropagation: Bidirectional)"},
		{"capabilities", checkCaps,
			"run as root, or grant CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN (setns into pod namespaces); see charts/warren values securityContext"},
		{"BTF of the running kernel", func() (string, error) {
			if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
				return "", err
			}
			return "/sys/kernel/btf/vmlinux", nil
		}, "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (bpftool map dump shows fields only with BTF)"},
		{"source address preservation", transparent.Check,
			"grant CAP_NET_ADMIN (IP_TRANSPARENT, ip rules in pods) and CAP_SYS_ADMIN (setns); the kernel needs CONFIG_IP_MULTIPLE_TABLES, CONFIG_IPV6_MULTIPLE_TABLES and net.ipv4.tcp_fwmark_accept (3.15); without them apps see the pod's own address as the source of inbound mesh connections"},
	}
	for _, addr := range ports {
		checks = append(checks, check{"port " + addr + " free", func() (string, error) {
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				// A running agent (doctor run beside it, as in its pod) holds
				// its ports with SO_REUSEPORT, which its successor shares.
				if sharedWithAgent(addr) {
					return "shared with a running agent (SO_REUSEPORT, as an agent's successor binds it)", nil
				}
				return "", err
			}
			ln.Close()
			return "free", nil
		}, "stop whatever listens on " + addr + " (another agent? ss -ltnp), or move the agent with --metrics-addr/--ready-addr/--admin-addr"})
	}
	return checks
}

// checkCaps reads the effective capability set of this process.
func checkCaps() (string, error) {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "", err
	}
	var eff uint64
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			if eff, err = strconv.ParseUint(strings.TrimSpace(v), 16, 64); err != nil {
				return "", fmt.Errorf("parse CapEff: %w", err)
			}
		}
	}
	var missing []string
	for name, bit := range map[string]uint{"CAP_NET_ADMIN": capNetAdmin, "CAP_SYS_ADMIN": capSysAdmin} {
		if eff&(1<<bit) == 0 {
			missing = append(missing, name)
		}
	}
	// CAP_BPF and CAP_PERFMON split off CAP_SYS_ADMIN in 5.8; either satisfies the loader.
	if eff&(1<<capBPF) == 0 && eff&(1<<capSysAdmin) == 0 {
		missing = append(missing, "CAP_BPF")
	}
	if len(missing) > 0 {
		return "", fmt.Errorf("missing %s", strings.Join(missing, ", "))
	}
	return fmt.Sprintf("CapEff=%016x", eff), nil
}

func runChecks(w io.Writer, checks []check) error {
	failed := 0
	for _, c := range checks {
		detail, err := c.run()
		if err != nil {
			failed++
			fix := c.fix
			var f fixer
			if errors.As(err, &f) {
				fix = f.Fix()
			}
			fmt.Fprintf(w, "FAIL  %-28s %v\n      fix: %s\n", c.name, err, fix)
			continue
		}
		fmt.Fprintf(w, "ok    %-28s %s\n", c.name, detail)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d checks failed", failed, len(checks))
	}
	fmt.Fprintln(w, "all checks passed")
	return nil
}
