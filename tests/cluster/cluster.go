package cluster

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Address plan, inside 198.18.0.0/15 and clear of tests/lab (198.18.0.0/24
// underlay, 198.19.0.0/16 pods, 198.18.200.0/24 VIPs) and of the unit tests'
// 198.18.100.0/24.
var (
	PodCIDR     = netip.MustParsePrefix("198.18.64.0/20")
	PodGateway  = netip.MustParseAddr("198.18.64.1")
	ServiceCIDR = netip.MustParsePrefix("198.18.80.0/24")
	// NodeIP is the node's address (apiserver, kubelet), on the bridge.
	NodeIP  = netip.MustParseAddr("198.18.81.1")
	nodeNet = netip.MustParsePrefix("198.18.81.0/24")
)

// KubeVersion is the version hack/build-envtest.sh builds.
const KubeVersion = "1.36.3"

// kubeletSysctls are the kernel settings the kubelet forces at start
// (vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1, ...);
// hostSysctls are others the node's components may change. All are saved
// before and restored after the kubelet starts, and at the end.
var (
	kubeletSysctls = []string{"vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops", "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes"}
	hostSysctls    = []string{"net.ipv4.ip_forward", "net.ipv4.conf.all.route_localnet", "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"}
)

// Config sets up a cluster. The zero value is a random prefix and the tools cache.
type Config struct {
	// Prefix names everything of the run: "wk" and six lowercase letters or digits.
	Prefix string
	// Tools is the tools cache (default $WARREN_TOOLS_CACHE or ~/.cache/warren/tools).
	Tools string
	// Images are docker-archive tarballs imported into containerd before the kubelet starts.
	Images []string
	// PauseImage is the sandbox image's reference (one of Images).
	PauseImage string
	// SharedMounts are host paths made shared mounts while the cluster runs
	// (HostToContainer volumes need a shared source; systemd makes "/" shared on
	// every normal node, this VM has no systemd). Reverted at the end.
	SharedMounts []string
	// Logf receives progress lines.
	Logf func(format string, args ...any)
}

// Cluster is a running single-node cluster.
type Cluster struct {
	Prefix     string
	Node       string
	Kubeconfig string
	Rest       *rest.Config
	Kube       kubernetes.Interface
	// Bin holds the binaries' paths by name.
	Bin map[string]string
	// State and Run are the run's directories (state, sockets).
	State, Run string
	// ContainerdSock is the run's containerd socket.
	ContainerdSock string

	cfg        Config
	lock, host *os.File
	procs      map[string]*exec.Cmd
	cgDaemons  string
	logs       string
	closers    []func() error
}

func (c *Cluster) logf(format string, args ...any) {
	if c.cfg.Logf != nil {
		c.cfg.Logf(format, args...)
	}
}

func randomPrefix() string {
	const chars = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := []byte("wk")
	for i := 0; i < 6; i++ {
		n, _ := rand.Int(rand.Reader, big.NewInt(int64(len(chars))))
		b = append(b, chars[n.Int64()])
	}
	return string(b)
}

// ToolsDir returns the tools cache.
func ToolsDir() string {
	if d := os.Getenv("WARREN_TOOLS_CACHE"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "warren", "tools")
}

// Binaries finds the cluster's programs: Kubernetes from the tools cache
// (make tools), containerd, runc, ctr, nft and the CNI plugins from apt
// (make deps). The error names what is missing.
func Binaries(tools string) (map[string]string, error) {
	bin := map[string]string{
		"etcd":                    filepath.Join(tools, "envtest-v"+KubeVersion, "etcd"),
		"kube-apiserver":          filepath.Join(tools, "envtest-v"+KubeVersion, "kube-apiserver"),
		"kube-controller-manager": filepath.Join(tools, "kube-node-v"+KubeVersion, "kube-controller-manager"),
		"kube-scheduler":          filepath.Join(tools, "kube-node-v"+KubeVersion, "kube-scheduler"),
		"kubelet":                 filepath.Join(tools, "kube-node-v"+KubeVersion, "kubelet"),
		"kube-proxy":              filepath.Join(tools, "kube-node-v"+KubeVersion, "kube-proxy"),
		"helm":                    filepath.Join(tools, "helm-v3.22.0", "helm"),
		"containerd":              "/usr/bin/containerd",
		"containerd-shim-runc-v2": "/usr/bin/containerd-shim-runc-v2",
		"ctr":                     "/usr/bin/ctr",
		"runc":                    "/usr/sbin/runc",
		"nft":                     "/usr/sbin/nft",
		"conntrack":               "/usr/sbin/conntrack",
		"cni-bridge":              "/usr/lib/cni/bridge",
		"cni-host-local":          "/usr/lib/cni/host-local",
		"cni-loopback":            "/usr/lib/cni/loopback",
	}
	var missing []string
	for name, p := range bin {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, name+" ("+p+")")
		}
	}
	if len(missing) > 0 {
		return bin, fmt.Errorf("missing %s: run make tools (Kubernetes, helm) and make deps (containerd, runc, containernetworking-plugins, nftables, conntrack)", strings.Join(missing, ", "))
	}
	return bin, nil
}

// Start brings a cluster up: removes crashed runs' leftovers, then starts
// etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd,
// the kubelet and kube-proxy (nftables mode) and waits for the node to be
// Ready. Stop removes it all; call it even when Start fails.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = randomPrefix()
	}
	if !prefixRE.MatchString(cfg.Prefix) {
		return nil, fmt.Errorf("cluster: prefix %q must match %s", cfg.Prefix, prefixPattern)
	}
	if cfg.Tools == "" {
		cfg.Tools = ToolsDir()
	}
	bin, err := Binaries(cfg.Tools)
	if err != nil {
		return nil, err
	}
	p := cfg.Prefix
	c := &Cluster{
		Prefix: p, Node: p + "-node", Bin: bin, cfg: cfg, procs: map[string]*exec.Cmd{},
		State: filepath.Join(stateRoot, p), Run: filepath.Join(lockDir, p),
	}
	c.ContainerdSock = filepath.Join(c.Run, "containerd.sock")
	c.logs = filepath.Join(c.State, "logs")
	if c.host, err = globalLock(); err != nil {
		return nil, fmt.Errorf("cluster: host lock: %w", err)
	}
	if err := CleanStale(); err != nil {
		c.logf("cleaning a crashed run's leftovers: %v", err)
	}
	if c.lock, err = acquireLock(p); err != nil {
		releaseHost(c.host)
		return nil, err
	}
	for _, d := range []string{c.State, c.Run, c.logs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return c, err
		}
	}
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"host", c.setupHost},
		{"control plane", c.startControlPlane},
		{"containerd", c.startContainerd},
		{"kubelet", c.startKubelet},
		{"kube-proxy", c.startKubeProxy},
		{"node Ready", c.waitNodeReady},
	}
	t0 := time.Now()
	for _, s := range steps {
		if err := s.fn(ctx); err != nil {
			return c, fmt.Errorf("cluster %s: %s: %w", p, s.name, err)
		}
		c.logf("cluster %s: %s up after %.1fs", p, s.name, time.Since(t0).Seconds())
	}
	return c, nil
}

// record appends a line to one of the run's record files (see removeRun).
func (c *Cluster) record(file, line string) error {
	return appendLine(filepath.Join(c.State, file), line)
}

func (c *Cluster) setupHost(ctx context.Context) error {
	// Cgroups: <prefix> in every hierarchy (the kubelet's cgroupRoot is
	// /<prefix>/kube); the daemons run in <unified>/<prefix>/daemons, so a
	// crashed run's processes (and containerd's shims) are found by membership.
	for _, d := range cgroupDirs(c.Prefix) {
		if err := os.MkdirAll(filepath.Join(d, "kube"), 0o755); err != nil {
			return err
		}
		if strings.Contains(d, "/cpuset/") {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				for _, sub := range []string{d, filepath.Join(d, "kube")} {
					v, _ := os.ReadFile(filepath.Join(filepath.Dir(sub), f))
					os.WriteFile(filepath.Join(sub, f), v, 0o644)
				}
			}
		}
	}
	u := unifiedRoot()
	if u == "" {
		return errors.New("no cgroup2 mount")
	}
	c.cgDaemons = filepath.Join(u, c.Prefix, "daemons")
	if err := os.MkdirAll(c.cgDaemons, 0o755); err != nil {
		return err
	}
	// Bridge with the pod gateway and the node's address.
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: c.Prefix + "br"}}
	if err := netlink.LinkAdd(br); err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	for _, a := range []string{PodGateway.String() + "/20", NodeIP.String() + "/32"} {
		addr, _ := netlink.ParseAddr(a)
		if err := netlink.AddrAdd(br, addr); err != nil {
			return err
		}
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return err
	}
	// Service IPs never leave through the host's uplink, even before kube-proxy.
	_, svc, _ := net.ParseCIDR(ServiceCIDR.String())
	if err := netlink.RouteReplace(&netlink.Route{LinkIndex: br.Attrs().Index, Dst: svc}); err != nil {
		return err
	}
	// Forward only what arrives on the bridge (pod -> ClusterIP -> pod); the
	// global ip_forward is untouched and pods have no default route.
	if err := writeSysctl("net.ipv4.conf."+c.Prefix+"br.forwarding", "1"); err != nil {
		return err
	}
	// Saved before anything can change them.
	for _, k := range append(append([]string{}, kubeletSysctls...), hostSysctls...) {
		if v, err := readSysctl(k); err == nil {
			if err := c.record("sysctl.saved", k+"="+v); err != nil {
				return err
			}
		}
	}
	// Network namespaces that exist now are not the run's.
	entries, _ := os.ReadDir(netnsDir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if err := os.WriteFile(filepath.Join(c.State, "netns.before"), []byte(strings.Join(names, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	// Host paths the node's components create when missing: removed at the end.
	for _, p := range []string{"/run/containerd", "/var/run/warren", "/run/warren", "/sys/fs/bpf/warren", "/var/lib/cni"} {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			c.record("created-paths", p)
		}
	}
	for _, m := range c.cfg.SharedMounts {
		if err := c.makeShared(m); err != nil {
			return err
		}
	}
	return nil
}

// makeShared makes m a shared mount (a bind onto itself first when it is no
// mount point), recording what it did for removeRun.
func (c *Cluster) makeShared(m string) error {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	isMount, shared := false, false
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if len(f) > 6 && f[4] == m {
			isMount = true
			shared = strings.Contains(strings.Join(f[6:], " "), "shared:")
		}
	}
	if !isMount {
		if err := os.MkdirAll(m, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m, m, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", m, err)
		}
		c.record("shared-mounts", "bind "+m)
	}
	if !shared {
		if err := unix.Mount("", m, "", unix.MS_SHARED, ""); err != nil {
			return fmt.Errorf("make-shared %s: %w", m, err)
		}
		c.record("shared-mounts", "shared "+m)
	}
	return nil
}

// start runs a daemon in the run's daemons cgroup with its log in logs/NAME.log.
func (c *Cluster) start(name string, env []string, args ...string) error {
	logf, err := os.Create(filepath.Join(c.logs, name+".log"))
	if err != nil {
		return err
	}
	cg, err := os.Open(c.cgDaemons)
	if err != nil {
		return err
	}
	defer cg.Close()
	cmd := exec.Command(c.Bin[name], args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, UseCgroupFD: true, CgroupFD: int(cg.Fd()), Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	logf.Close()
	c.procs[name] = cmd
	go cmd.Wait()
	return nil
}

// pathEnv is a PATH without iptables: the kubelet and kube-proxy would
// otherwise add chains to the host's iptables(-nft) tables; kube-proxy runs
// in nftables mode and finds nft and conntrack here.
func (c *Cluster) pathEnv() []string {
	sbin := filepath.Join(c.State, "sbin")
	os.MkdirAll(sbin, 0o755)
	for _, b := range []string{"nft", "conntrack"} {
		os.Symlink(c.Bin[b], filepath.Join(sbin, b))
	}
	return []string{"PATH=" + sbin + ":/usr/local/bin:/usr/bin:/bin", "HOME=" + c.State}
}

func waitFor(ctx context.Context, what string, timeout time.Duration, fn func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var err error
	for {
		if err = fn(); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last: %v)", what, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// freePort returns a free TCP port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *Cluster) startControlPlane(ctx context.Context) error {
	pk, err := newPKI(filepath.Join(c.State, "pki"))
	if err != nil {
		return err
	}
	node := net.IP(NodeIP.AsSlice())
	svc1 := ServiceCIDR.Addr().Next()
	for _, cert := range []struct {
		name, cn string
		orgs     []string
		ips      []net.IP
		dns      []string
	}{
		{"apiserver", "kube-apiserver", nil, []net.IP{node, net.IP(svc1.AsSlice()), net.IPv4(127, 0, 0, 1)},
			[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}},
		{"admin", c.Prefix + "-admin", []string{"system:masters"}, nil, nil},
		{"apiserver-kubelet-client", c.Prefix + "-apiserver-kubelet-client", []string{"system:masters"}, nil, nil},
		{"kcm", "system:kube-controller-manager", nil, nil, nil},
		{"scheduler", "system:kube-scheduler", nil, nil, nil},
		{"kubelet", "system:node:" + c.Node, []string{"system:nodes"}, nil, nil},
		{"kubelet-serving", "system:node:" + c.Node, []string{"system:nodes"}, []net.IP{node}, []string{c.Node}},
		{"kube-proxy", "system:kube-proxy", nil, nil, nil},
	} {
		if err := pk.issue(cert.name, cert.cn, cert.orgs, cert.ips, cert.dns); err != nil {
			return err
		}
	}
	if err := pk.serviceAccountKey(); err != nil {
		return err
	}
	api := "https://" + NodeIP.String() + ":6443"
	for _, n := range []string{"admin", "kcm", "scheduler", "kubelet", "kube-proxy"} {
		if _, err := pk.kubeconfig(n, api); err != nil {
			return err
		}
	}
	c.Kubeconfig = filepath.Join(pk.dir, "admin.kubeconfig")
	P := func(f string) string { return filepath.Join(pk.dir, f) }

	etcdPort, _ := freePort()
	peerPort, _ := freePort()
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	env := c.pathEnv()
	if err := c.start("etcd", env, "--name", c.Prefix, "--data-dir", filepath.Join(c.State, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", c.Prefix+"="+peerURL, "--log-level", "warn",
		"--unsafe-no-fsync"); err != nil {
		return err
	}
	if err := waitFor(ctx, "etcd", 60*time.Second, func() error {
		r, err := http.Get(etcdURL + "/health")
		if err == nil {
			r.Body.Close()
			if r.StatusCode != 200 {
				err = fmt.Errorf("status %d", r.StatusCode)
			}
		}
		return err
	}); err != nil {
		return err
	}
	if err := c.start("kube-apiserver", env, "--etcd-servers", etcdURL, "--etcd-prefix", "/"+c.Prefix,
		"--bind-address", NodeIP.String(), "--advertise-address", NodeIP.String(), "--secure-port", "6443",
		"--service-cluster-ip-range", ServiceCIDR.String(),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", P("sa.pub"), "--service-account-signing-key-file", P("sa.key"),
		"--tls-cert-file", P("apiserver.crt"), "--tls-private-key-file", P("apiserver.key"), "--client-ca-file", P("ca.crt"),
		"--kubelet-client-certificate", P("apiserver-kubelet-client.crt"), "--kubelet-client-key", P("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority", P("ca.crt"),
		// By IP: a node name would go to the host's resolver, and out of the machine.
		"--kubelet-preferred-address-types", "InternalIP",
		"--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction", "--allow-privileged=true",
		"--endpoint-reconciler-type", "lease", "--profiling=false"); err != nil {
		return err
	}
	if c.Rest, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return err
	}
	c.Rest.QPS, c.Rest.Burst = 50, 100
	if c.Kube, err = kubernetes.NewForConfig(c.Rest); err != nil {
		return err
	}
	if err := waitFor(ctx, "kube-apiserver /readyz", 120*time.Second, func() error {
		_, err := c.Kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return err
	}
	kcmPort, _ := freePort()
	if err := c.start("kube-controller-manager", env, "--kubeconfig", P("kcm.kubeconfig"),
		"--authentication-kubeconfig", P("kcm.kubeconfig"), "--authorization-kubeconfig", P("kcm.kubeconfig"),
		"--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(kcmPort), "--leader-elect=false",
		"--use-service-account-credentials", "--service-account-private-key-file", P("sa.key"),
		"--root-ca-file", P("ca.crt"), "--cluster-signing-cert-file", P("ca.crt"), "--cluster-signing-key-file", P("ca.key"),
		"--service-cluster-ip-range", ServiceCIDR.String(), "--cluster-cidr", PodCIDR.String(),
		"--allocate-node-cidrs=false", "--profiling=false"); err != nil {
		return err
	}
	schedPort, _ := freePort()
	return c.start("kube-scheduler", env, "--kubeconfig", P("scheduler.kubeconfig"),
		"--authentication-kubeconfig", P("scheduler.kubeconfig"), "--authorization-kubeconfig", P("scheduler.kubeconfig"),
		"--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(schedPort), "--leader-elect=false", "--profiling=false")
}

func (c *Cluster) startContainerd(ctx context.Context) error {
	d := filepath.Join(c.State, "containerd")
	cni := filepath.Join(c.State, "cni")
	for _, x := range []string{d, filepath.Join(cni, "net.d"), filepath.Join(cni, "ipam")} {
		if err := os.MkdirAll(x, 0o755); err != nil {
			return err
		}
	}
	conflist := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": %q, "plugins": [
  {"type": "bridge", "bridge": %q, "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": %q,
            "ranges": [[{"subnet": %q, "rangeStart": %q, "gateway": %q}]],
            "routes": [{"dst": %q}, {"dst": %q}]}}]}
`, c.Prefix, c.Prefix+"br", filepath.Join(cni, "ipam"), PodCIDR.String(), "198.18.64.10", PodGateway.String(),
		ServiceCIDR.String(), nodeNet.String())
	if err := os.WriteFile(filepath.Join(cni, "net.d", "10-"+c.Prefix+".conflist"), []byte(conflist), 0o644); err != nil {
		return err
	}
	toml := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  disable_apparmor = true
  # Machines whose bounding set lacks CAP_SYS_RESOURCE (this VM) cannot lower
  # oom_score_adj: without this every sandbox fails in runc's nsexec.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = %q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %q
    max_conf_num = 1
`, filepath.Join(d, "root"), filepath.Join(c.Run, "containerd"), c.ContainerdSock, c.ContainerdSock+".ttrpc",
		filepath.Join(d, "opt"), c.cfg.PauseImage, c.Bin["runc"], filepath.Join(cni, "net.d"))
	if err := os.WriteFile(filepath.Join(d, "config.toml"), []byte(toml), 0o644); err != nil {
		return err
	}
	env := append(c.pathEnv()[:0:0], "PATH=/usr/bin:/bin", "HOME="+c.State)
	if err := c.start("containerd", env, "--config", filepath.Join(d, "config.toml")); err != nil {
		return err
	}
	if err := waitFor(ctx, "containerd", 60*time.Second, func() error {
		return exec.CommandContext(ctx, c.Bin["ctr"], "--address", c.ContainerdSock, "version").Run()
	}); err != nil {
		return err
	}
	for _, img := range c.cfg.Images {
		if err := c.ImportImage(ctx, img); err != nil {
			return err
		}
	}
	return nil
}

// ImportImage imports a docker-archive tarball into containerd's k8s.io namespace.
func (c *Cluster) ImportImage(ctx context.Context, tarball string) error {
	out, err := exec.CommandContext(ctx, c.Bin["ctr"], "--address", c.ContainerdSock, "-n", "k8s.io", "images", "import", tarball).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %w: %s", tarball, err, out)
	}
	return nil
}

func (c *Cluster) startKubelet(ctx context.Context) error {
	d := filepath.Join(c.State, "kubelet")
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	// Pods resolve through the cluster DNS (startDNS: Services only); a pod with
	// dnsPolicy Default gets its own loopback. No DNS query leaves the machine.
	if err := os.WriteFile(filepath.Join(d, "resolv.conf"), []byte("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"), 0o644); err != nil {
		return err
	}
	P := func(f string) string { return filepath.Join(c.State, "pki", f) }
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %[1]s
port: 10250
readOnlyPort: 0
healthzBindAddress: %[1]s
healthzPort: 10248
tlsCertFile: %[2]s
tlsPrivateKeyFile: %[3]s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[4]s}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://%[5]s
imageServiceEndpoint: unix://%[5]s
cgroupDriver: cgroupfs
cgroupRoot: /%[6]s/kube
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [%[1]s]
resolvConf: %[7]s
maxPods: 60
serializeImagePulls: true
rotateCertificates: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%%, imagefs.available: 1%%, nodefs.inodesFree: 1%%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`, NodeIP, P("kubelet-serving.crt"), P("kubelet-serving.key"), P("ca.crt"), c.ContainerdSock, c.Prefix, filepath.Join(d, "resolv.conf"))
	if err := os.WriteFile(filepath.Join(d, "config.yaml"), []byte(cfg), 0o644); err != nil {
		return err
	}
	if err := c.startDNS(ctx); err != nil {
		return fmt.Errorf("cluster DNS: %w", err)
	}
	if err := c.start("kubelet", c.pathEnv(), "--config", filepath.Join(d, "config.yaml"),
		"--kubeconfig", P("kubelet.kubeconfig"), "--root-dir", filepath.Join(d, "root"),
		"--hostname-override", c.Node, "--node-ip", NodeIP.String(), "--v", "1"); err != nil {
		return err
	}
	if err := waitFor(ctx, "kubelet healthz", 90*time.Second, func() error {
		r, err := http.Get("http://" + NodeIP.String() + ":10248/healthz")
		if err == nil {
			r.Body.Close()
			if r.StatusCode != 200 {
				err = fmt.Errorf("status %d", r.StatusCode)
			}
		}
		return err
	}); err != nil {
		return err
	}
	// The kubelet sets its sysctls at start; put the host's values back.
	time.Sleep(2 * time.Second)
	return c.restoreSysctls()
}

func (c *Cluster) restoreSysctls() error {
	var errs []error
	for _, kv := range readLines(filepath.Join(c.State, "sysctl.saved")) {
		if k, v, ok := strings.Cut(kv, "="); ok {
			if cur, _ := readSysctl(k); cur != v {
				c.logf("restoring sysctl %s=%s (was set to %s)", k, v, cur)
				if err := writeSysctl(k, v); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}

func (c *Cluster) startKubeProxy(ctx context.Context) error {
	cfg := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: %q}
hostnameOverride: %s
clusterCIDR: %s
healthzBindAddress: %s:10256
metricsBindAddress: %s:10249
nodePortAddresses: ["%s/32"]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
`, filepath.Join(c.State, "pki", "kube-proxy.kubeconfig"), c.Node, PodCIDR, NodeIP, NodeIP, NodeIP)
	path := filepath.Join(c.State, "kube-proxy.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return err
	}
	return c.start("kube-proxy", c.pathEnv(), "--config", path)
}

func (c *Cluster) waitNodeReady(ctx context.Context) error {
	return waitFor(ctx, "node Ready", 180*time.Second, func() error {
		n, err := c.Kube.CoreV1().Nodes().Get(ctx, c.Node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return errors.New("not Ready")
	})
}

// Logs returns the path of a component's log.
func (c *Cluster) Logs(name string) string { return filepath.Join(c.logs, name+".log") }

// stopProc sends SIGTERM to the daemon Start started (by its PID), then SIGKILL.
func (c *Cluster) stopProc(name string, grace time.Duration) {
	cmd := c.procs[name]
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if syscall.Kill(cmd.Process.Pid, 0) != nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	cmd.Process.Kill()
}

// Stop deletes the workloads through the kubelet (CNI DEL, netns removal),
// stops the daemons and removes everything the run created or changed on
// the host. The errors are what could not be removed.
func (c *Cluster) Stop(ctx context.Context) error {
	if c == nil {
		return nil
	}
	if c.Kube != nil && c.procs["kubelet"] != nil {
		c.deleteWorkloads(ctx)
	}
	c.stopProc("kube-proxy", 5*time.Second)
	c.stopProc("kubelet", 10*time.Second)
	if c.procs["containerd"] != nil {
		c.removeSandboxes(ctx)
	}
	c.stopProc("containerd", 10*time.Second)
	for _, n := range []string{"kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"} {
		c.stopProc(n, 10*time.Second)
	}
	for _, f := range c.closers {
		f()
	}
	err := removeRun(c.Prefix, c.logf)
	if c.lock != nil {
		c.lock.Close()
	}
	if c.host != nil {
		releaseHost(c.host)
	}
	return err
}

func (c *Cluster) deleteWorkloads(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	nss, err := c.Kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	zero := int64(1)
	for _, ns := range nss.Items {
		c.Kube.AppsV1().DaemonSets(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		c.Kube.AppsV1().Deployments(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		c.Kube.AppsV1().ReplicaSets(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		c.Kube.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
	}
	waitFor(ctx, "pods gone", 50*time.Second, func() error {
		pods, err := c.Kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(pods.Items) > 0 {
			return fmt.Errorf("%d pods left", len(pods.Items))
		}
		return nil
	})
}

// removeSandboxes stops and removes what containerd still runs (containers
// created outside the CRI, sandboxes the kubelet did not finish).
func (c *Cluster) removeSandboxes(ctx context.Context) {
	ctr := func(args ...string) string {
		out, _ := exec.CommandContext(ctx, c.Bin["ctr"], append([]string{"--address", c.ContainerdSock, "-n", "k8s.io"}, args...)...).Output()
		return string(out)
	}
	for _, id := range strings.Fields(ctr("tasks", "ls", "-q")) {
		ctr("tasks", "kill", "-s", "KILL", id)
	}
	time.Sleep(500 * time.Millisecond)
	for _, id := range strings.Fields(ctr("containers", "ls", "-q")) {
		ctr("tasks", "delete", "-f", id)
		ctr("containers", "delete", id)
	}
}
