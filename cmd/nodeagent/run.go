package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/warren-mesh/warren/internal/gctune"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/balance"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/store"
	"github.com/warren-mesh/warren/pkg/handover"
	"github.com/warren-mesh/warren/pkg/hbone"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/loader"
	"github.com/warren-mesh/warren/pkg/ztunnel"
)

// runOptions are the agent's settings; every flag is also an environment variable.
type runOptions struct {
	provider     string
	configPath   string
	node         string
	trustDomain  string
	ca           caOptions // --ca-provider and its providers' flags (ca.go)
	cgroupRoot   string
	pinDir       string
	excludePorts []uint
	excludeCIDRs []string
	exemptNode   []string
	adminAddr    string
	metricsAddr  string
	readyAddr    string
	drain        time.Duration
	// stateDir holds the hand-over sockets (and the fd holder's).
	stateDir        string
	handoverTimeout time.Duration
	fdStore         string
	logLevel        string
	sameNode        bool
	connsPerPeer    int
	memoryLimit     int64         // the container's memory limit in bytes (memlimit.go)
	kube            kubeOptions   // --provider=kubernetes (kube.go)
	istiod          istiodOptions // --provider=istiod (istiod.go)
	// changed reports whether a flag was set on the command line or by its
	// environment variable.
	changed func(flag string) bool
}

func newRunCmd() *cobra.Command {
	o := &runOptions{}
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the node agent: capture enrolled workloads' TCP and tunnel it over HBONE",
		Long: `Run the node agent.

Where the configuration comes from is --provider: file (a local YAML file in
ztunnel's LOCAL_XDS_PATH shape, --config, applied live when it changes) or
kubernetes (this node's pods, Services, EndpointSlices and Istio's security
policies, watched through the API server). Who signs the workloads' certificates
is --ca-provider: builtin (an in-process CA whose key and root are in --ca-dir),
spire (the node's SPIRE agent, --spire-admin-socket) or istiod (Istio's CA,
--istiod-addr). Certificates renew at half-life, without a restart, whichever
provider signs them.

The agent attaches its BPF programs at the cgroup2 root, opens listeners inside
every local workload's network namespace (15001 outbound, 15006 plaintext
inbound, 15008 HBONE), and serves metrics on :15020, readiness on :15021 and the
admin API on 127.0.0.1:15000. On SIGTERM it keeps accepting until a successor
serves every pod (or --handover-timeout), stops accepting, drains for up to
--drain-timeout, and keeps the BPF pins, so a restarted agent takes over
without a gap in capture. The exception is an uninstall: with --pod-name set
(the chart does), an agent with no successor whose pod's DaemonSet was deleted
removes capture from the node as nodeagent uninstall does; when it cannot
tell (API server unreachable, owner unknown) it keeps the pins.

To run it in a named network namespace, use nsenter --net=/var/run/netns/<name>
nodeagent run ...: ip netns exec mounts a new /sys, which hides the host's
cgroup2 and bpffs (the agent refuses to start that way and says so).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			o.changed = func(flag string) bool { return cmd.Flags().Changed(flag) }
			return o.run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.provider, "provider", "file", fmt.Sprintf("configuration provider, one of %v", providers))
	f.StringVar(&o.configPath, "config", "", "local configuration file in ztunnel's LOCAL_XDS_PATH shape (--provider=file)")
	f.StringVar(&o.node, "node", "", "this node's name, as workloads' node field names it (default: the hostname)")
	f.StringVar(&o.trustDomain, "trust-domain", config.DefaultTrustDomain, "SPIFFE trust domain of the mesh")
	o.ca.addFlags(f)
	f.StringVar(&o.cgroupRoot, "cgroup-root", "", "cgroup2 directory to attach capture at (default: the cgroup2 mount's root)")
	f.StringVar(&o.pinDir, "pin-dir", loader.DefaultPinDir, "bpffs directory for warren's pinned links and maps")
	f.UintSliceVar(&o.excludePorts, "exclude-ports", nil, "outbound destination ports never captured")
	f.StringSliceVar(&o.excludeCIDRs, "exclude-cidrs", nil, "outbound destination CIDRs never captured")
	f.StringSliceVar(&o.exemptNode, "exempt-sources", nil, "source addresses never steered to 15006, so kubelet probes reach pods even in STRICT mode (default: this node's addresses; \"none\" exempts nothing)")
	f.StringVar(&o.adminAddr, "admin-addr", "127.0.0.1:15000", "admin API address (keep it on localhost)")
	f.StringVar(&o.metricsAddr, "metrics-addr", ":15020", "Prometheus /metrics address")
	f.StringVar(&o.readyAddr, "ready-addr", ":15021", "/healthz/ready address")
	f.DurationVar(&o.drain, "drain-timeout", 30*time.Second, "how long SIGTERM waits for open connections before closing them")
	f.StringVar(&o.stateDir, "state-dir", defaultStateDir, "directory for the hand-over sockets between an agent and its successor (shared by every agent of the node)")
	f.DurationVar(&o.handoverTimeout, "handover-timeout", 20*time.Second, "how long SIGTERM keeps accepting while waiting for a successor agent to serve every pod (0: stop at once)")
	f.StringVar(&o.fdStore, "fd-store", "", "unix socket of the listener holder (nodeagent fdstore) that keeps pod listeners open across agent crashes (default: <state-dir>/fdstore.sock; \"none\" disables)")
	f.IntVar(&o.connsPerPeer, "hbone-conns-per-peer", 4, "HBONE connections concurrent streams to one peer are spread over before they share them (each has its own TLS session, read loop and write lock; streams opened one after another keep using one); 1: one shared connection per peer")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error (changeable at run time: POST /logging?level=debug)")
	f.BoolVar(&o.sameNode, "same-node-fast-path", true, "carry connections between two pods of this node without TLS and HTTP/2: authorized as over HBONE, relayed with splice(2) (README: Data path); false sends them over HBONE")
	f.Int64Var(&o.memoryLimit, "memory-limit", 0, "the container's memory limit in bytes (the chart sets it from resources.limits.memory): the Go runtime's soft limit is 90 % of it unless GOMEMLIMIT is set; 0: none")
	o.kube.addFlags(f)
	o.istiod.addFlags(f)
	documentEnv(f)
	return cmd
}

// agent is the running node agent: what run builds, in dependency order.
type agent struct {
	opts     *runOptions
	level    *slog.LevelVar
	log      *slog.Logger
	store    *store.Store
	provider provider
	loader   *loader.Loader
	certs    *identity.Manager
	pool     *hbone.Pool
	proxy    *ztunnel.Proxy
	registry *prometheus.Registry
	identity *identityStack

	http        httpServers
	handover    *handover.Server
	terminating *atomic.Bool
	stopped     atomic.Pointer[string] // why the agent stopped accepting
}

// defaultStateDir is where agents of one node find each other.
const defaultStateDir = "/var/run/warren"

func (o *runOptions) run(ctx context.Context) error {
	// First: under `ip netns exec` nothing below can work, and the errors it
	// would give (no cgroup2 mount, no bpffs) would not say why.
	if _, err := checkNotIPNetnsExec(); err != nil {
		var f fixer
		if errors.As(err, &f) {
			return fmt.Errorf("%w; %s", err, f.Fix())
		}
		return fmt.Errorf("check how the agent was started: %w", err)
	}
	if o.changed == nil {
		o.changed = func(string) bool { return false }
	}
	if err := o.ca.validate(o.changed); err != nil {
		return err
	}
	if o.node == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("--node not given and no hostname: %w", err)
		}
		o.node = h
	}
	level := new(slog.LevelVar)
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", o.logLevel)
	}
	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", o.trustDomain, err)
	}
	excludeCIDRs := make([]netip.Prefix, 0, len(o.excludeCIDRs))
	for _, s := range o.excludeCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return fmt.Errorf("--exclude-cidrs %q: %w", s, err)
		}
		excludeCIDRs = append(excludeCIDRs, p.Masked())
	}
	excludePorts := make([]uint16, 0, len(o.excludePorts))
	for _, p := range o.excludePorts {
		if p == 0 || p > 65535 {
			return fmt.Errorf("--exclude-ports %d: not a port", p)
		}
		excludePorts = append(excludePorts, uint16(p))
	}
	exempt, err := exemptSources(o.exemptNode)
	if err != nil {
		return err
	}

	a := &agent{opts: o, level: level, registry: prometheus.NewRegistry()}
	a.log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	applyMemoryLimit(o.memoryLimit, a.log)
	a.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a.store = store.New(o.node)
	a.registry.MustRegister(store.NewCollector(a.store))
	if a.provider, err = newProvider(o, a.store, a.log); err != nil {
		return err
	}

	a.identity, err = newIdentityStack(&o.ca, identityDeps{
		trustDomain: td,
		clusterID:   o.kube.istioClusterID(),
		nodeHas:     a.nodeHas,
		log:         a.log,
		registry:    a.registry,
	})
	if err != nil {
		return err
	}
	defer a.identity.close()
	a.certs = a.identity.certs

	if o.cgroupRoot, err = hostCgroupRoot(o.cgroupRoot, o.stateDir, a.log); err != nil {
		return err
	}
	a.loader, err = loader.Open(loader.Config{CgroupPath: o.cgroupRoot, PinDir: o.pinDir, ExcludePorts: excludePorts, ExcludeCIDRs: excludeCIDRs})
	if err != nil {
		return fmt.Errorf("load BPF capture (run nodeagent doctor): %w", err)
	}
	defer a.loader.Close() // keeps the pins: capture outlives the process
	a.registry.MustRegister(ztunnel.NewBPFCollector(a.loader))

	var proxy *ztunnel.Proxy
	if o.connsPerPeer < 1 {
		return fmt.Errorf("--hbone-conns-per-peer %d: must be at least 1", o.connsPerPeer)
	}
	a.pool, err = hbone.NewPool(hbone.PoolConfig{
		TLS:          a.certs,
		Logger:       a.log,
		ConnsPerPeer: o.connsPerPeer,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return proxy.DialTunnel(ctx, network, addr)
		},
	})
	if err != nil {
		return fmt.Errorf("HBONE pool: %w", err)
	}
	defer a.pool.Close()
	var listeners ztunnel.ListenerStore
	fds := a.connectFDStore(ctx)
	if fds != nil {
		defer fds.Client.Close()
		listeners = fds
	}
	proxy, err = ztunnel.New(ztunnel.Deps{
		Store:         a.store,
		Capture:       a.loader,
		Certs:         a.certs,
		Tunnels:       a.pool,
		Balancer:      balance.New(nil),
		Metrics:       ztunnel.NewMetrics(a.registry),
		Log:           a.log,
		AccessLog:     slog.New(slog.NewJSONHandler(os.Stdout, nil)).With("log", "access"),
		ExemptSources: exempt,
		Listeners:     listeners,

		SameNodeFastPath: o.sameNode,
	})
	if err != nil {
		return err
	}
	a.proxy = proxy
	owner, err := newOwnerWatchFromFlags(o, a.log)
	if err != nil {
		return err
	}

	// SIGTERM hands over to a successor; SIGINT (an operator's Ctrl-C)
	// stops without waiting for one.
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigc)
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var got atomic.Value
	go func() {
		select {
		case s := <-sigc:
			got.Store(s)
			stop()
		case <-ctx.Done():
		}
	}()
	if err := a.listenHTTP(); err != nil {
		return err
	}
	defer a.http.close()
	stopHandover, err := a.startHandover(ctx)
	if err != nil {
		return err
	}
	defer stopHandover()
	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	errc := make(chan error, 3)
	go func() { errc <- a.provider.Run(runCtx) }()
	go func() { errc <- proxy.Run(runCtx) }()
	if fds != nil {
		go a.watchFDStore(runCtx, fds)
	}
	if owner != nil {
		go owner.run(runCtx)
	}
	if run := a.identity.run; run != nil {
		go func() { errc <- run(runCtx) }()
	}
	go gctune.New(a.log).Run(runCtx, gctuneEvery)
	a.log.Info("node agent running", "node", o.node, "trust_domain", td.String(), "provider", o.provider, "ca_provider", a.identity.name, "pin_dir", a.loader.PinDir())

	var runErr error
	uninstall := false
	select {
	case <-ctx.Done():
		// Hand-over, not hang-up: keep accepting until a successor serves
		// every pod (package handover), then stop and drain.
		why := "SIGINT: stopping without waiting for a successor"
		if s, _ := got.Load().(os.Signal); s != syscall.SIGINT {
			var handed bool
			why, handed = a.awaitSuccessor()
			// No successor: a restart whose successor is late, or an
			// uninstall, which only the DaemonSet's fate tells apart.
			if !handed && owner != nil {
				var because string
				uninstall, because = owner.uninstalled(context.Background())
				why += "; " + because
			}
		}
		a.stopped.Store(&why)
		a.log.Info("shutting down: no new connections; draining", "why", why, "grace", o.drain.String())
	case runErr = <-errc:
		why := "agent stopped: " + runErr.Error()
		a.stopped.Store(&why)
		a.log.Error("agent stopped", "err", runErr)
	}
	if uninstall {
		// Stop following the configuration first (no pod enrolled again),
		// then detach capture while still accepting: connects redirected
		// until then are served, later ones go direct, none is refused.
		// The connections being drained are already proxied.
		cancelRun()
		a.uninstallNode()
	}
	proxy.StopAccepting()
	// Stop following the configuration: a draining agent starts nothing.
	cancelRun()
	drainCtx, cancel := context.WithTimeout(context.Background(), o.drain)
	defer cancel()
	if err := proxy.Shutdown(drainCtx); err != nil {
		a.log.Warn("drain", "err", err)
	}
	if uninstall {
		a.log.Info("stopped; warren is uninstalled from this node")
		return runErr
	}
	a.log.Info("stopped; BPF capture stays pinned for the next agent", "pin_dir", a.loader.PinDir())
	return runErr
}

// uninstallNode removes capture from the node after the agent's DaemonSet
// was deleted. A failure is logged, never retried: what is left is what
// nodeagent uninstall removes by hand.
func (a *agent) uninstallNode() {
	say := func(format string, args ...any) { a.log.Info("uninstall: " + fmt.Sprintf(format, args...)) }
	if err := uninstallNode(context.Background(), a.loader.PinDir(), a.opts.fdStorePath(), say); err != nil {
		a.log.Error("uninstall from the node failed: run nodeagent uninstall on it", "err", err)
	}
}

// nodeHas tells the CA whether a pod on this node has id: the agent obtains
// certificates only for its own workloads.
func (a *agent) nodeHas(id identity.Identity) bool {
	for _, w := range a.store.Current().EnrolledWorkloads() {
		if w.Identity() == id.String() {
			return true
		}
	}
	return false
}

func (a *agent) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.registry, promhttp.HandlerOpts{Registry: a.registry}))
	return mux
}

func (a *agent) readyHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if err := a.ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// ready is nil once the configuration is loaded and every local workload has
// its certificate, listeners and capture; otherwise it says what is missing.
func (a *agent) ready() error {
	if err := a.stoppedReason(); err != nil {
		return err
	}
	err := a.proxy.Ready()
	if err == nil {
		return a.certs.Ready()
	}
	if perr := a.provider.LastError(); perr != nil {
		return errors.Join(err, fmt.Errorf("%s provider: %w", a.opts.provider, perr))
	}
	return err
}

// exemptSources parses --exempt-sources; unset, it is every address of the
// agent's own network namespace (the node's, where kubelet probes come from).
func exemptSources(flag []string) ([]netip.Addr, error) {
	if len(flag) == 1 && flag[0] == "none" {
		return nil, nil
	}
	var out []netip.Addr
	if len(flag) == 0 {
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return nil, fmt.Errorf("list this node's addresses for --exempt-sources: %w", err)
		}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && !p.Addr().IsLoopback() && !p.Addr().IsLinkLocalUnicast() {
				out = append(out, p.Addr())
			}
		}
		return out, nil
	}
	for _, s := range flag {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("--exempt-sources %q: %w", s, err)
		}
		out = append(out, a)
	}
	return out, nil
}
