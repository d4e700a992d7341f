//go:build !nokube

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/warren-mesh/warren/pkg/caserver"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
)

// caServeOptions are the flags of `nodeagent ca serve`.
type caServeOptions struct {
	trustDomain  string
	caDir        string
	listen       string
	httpAddr     string
	kubeconfig   string
	audiences    []string
	nodeAgents   []string
	maxTTL       time.Duration
	servingNames []string
	servingTTL   time.Duration
	rate         float64
	burst        int
	logLevel     string
	kubeQPS      float32
	kubeBurst    int
}

// newCACmd is `nodeagent ca`, the CA service's commands.
func newCACmd() *cobra.Command {
	ca := &cobra.Command{
		Use:   "ca",
		Short: "warren's CA service: the one process holding the mesh's CA key",
	}
	ca.AddCommand(newCAServeCmd())
	return ca
}

func newCAServeCmd() *cobra.Command {
	o := &caServeOptions{}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Sign node agents' workload certificates over Istio's CA API, for the pods on each caller's node only",
		Long: `serve runs the CA service (package pkg/caserver): IstioCertificateService/CreateCertificate
over gRPC with TLS, the CA key read from --ca-dir (the chart mounts its Secret only
into this Deployment). Each caller is authenticated by its projected ServiceAccount
token (TokenReview, audience --audience), may impersonate only if its ServiceAccount
is one of --node-agent-sa, and only for identities of pods scheduled on its own node
(the node of the pod its token is bound to). Node agents use it with
--ca-provider=warren.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			return runCAServe(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.trustDomain, "trust-domain", config.DefaultTrustDomain, "SPIFFE trust domain the CA signs for")
	f.StringVar(&o.caDir, "ca-dir", "/var/run/secrets/warren/ca", "CA directory: ca-cert.pem, ca-key.pem, optional root-cert.pem and cert-chain.pem (the chart's CA Secret)")
	f.StringVar(&o.listen, "listen", ":15012", "gRPC (TLS) address of IstioCertificateService")
	f.StringVar(&o.httpAddr, "http-addr", ":15014", "HTTP address of /metrics and /healthz/ready (\"\" for none)")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster configuration)")
	f.StringSliceVar(&o.audiences, "audience", []string{caserver.DefaultAudience}, "token audiences accepted (the agents' projected token audience)")
	f.StringSliceVar(&o.nodeAgents, "node-agent-sa", []string{"warren-system/warren-nodeagent"}, "namespace/name of the ServiceAccounts allowed to impersonate the pods of their node (the node agents')")
	f.DurationVar(&o.maxTTL, "cert-max-ttl", caserver.DefaultMaxTTL, "longest validity of a workload certificate (a request for less gets less)")
	f.StringSliceVar(&o.servingNames, "serving-names", nil, "DNS names (or IPs) of the CA's serving certificate: the host of the agents' --ca-addr, e.g. warren-ca.warren-system.svc (required)")
	f.DurationVar(&o.servingTTL, "serving-cert-ttl", caserver.DefaultServingTTL, "validity of the serving certificate (renewed at half-life)")
	f.Float64Var(&o.rate, "rate", caserver.DefaultRate, "requests per second per caller (ServiceAccount and node) after the burst; negative: unlimited")
	f.IntVar(&o.burst, "burst", caserver.DefaultBurst, "requests a caller may make at once")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.Float32Var(&o.kubeQPS, "kube-qps", 50, "API requests per second (one TokenReview per certificate request; client-go's default of 5 would cap the whole CA at 5 certificates a second)")
	f.IntVar(&o.kubeBurst, "kube-burst", 100, "API requests at once")
	documentEnv(f)
	return cmd
}

func runCAServe(ctx context.Context, o *caServeOptions) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", o.logLevel)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", o.trustDomain, err)
	}
	if len(o.servingNames) == 0 {
		return errors.New("--serving-names: give the DNS names agents dial (the host of their --ca-addr), e.g. warren-ca.warren-system.svc")
	}
	var agents []types.NamespacedName
	for _, s := range o.nodeAgents {
		ns, name, ok := strings.Cut(s, "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return fmt.Errorf("--node-agent-sa %q: want namespace/name of a ServiceAccount", s)
		}
		agents = append(agents, types.NamespacedName{Namespace: ns, Name: name})
	}
	ca, err := builtinca.LoadDir(o.caDir, false, builtinca.Options{TrustDomain: td, TTL: o.maxTTL})
	if err != nil {
		return fmt.Errorf("ca serve: %w (--ca-dir must hold ca-cert.pem and ca-key.pem: the chart's CA Secret)", err)
	}
	var cfg *rest.Config
	if o.kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	}
	if err != nil {
		return fmt.Errorf("ca serve: Kubernetes client configuration: %w (outside a cluster, give --kubeconfig)", err)
	}
	cfg.QPS, cfg.Burst = o.kubeQPS, o.kubeBurst
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("ca serve: Kubernetes client: %w", err)
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	pods, err := caserver.NewPodIndex(kube, 0)
	if err != nil {
		return err
	}
	pods.Start(ctx)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := caserver.New(caserver.Options{CA: ca, Kube: kube, Pods: pods, Audiences: o.audiences, NodeAgents: agents,
		MaxTTL: o.maxTTL, Rate: o.rate, Burst: o.burst, Registry: reg, Logger: log})
	if err != nil {
		return err
	}
	serving, err := caserver.NewServingCert(ca, o.servingNames, nil, o.servingTTL, nil)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("ca serve: --listen %s: %w", o.listen, err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(serving.TLSConfig())))
	pb.RegisterIstioCertificateServiceServer(gs, srv)

	errc := make(chan error, 2)
	if o.httpAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
			if err := srv.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
			if leaf := serving.Leaf(); time.Now().After(leaf.NotAfter) {
				http.Error(w, "not ready: serving certificate expired at "+leaf.NotAfter.UTC().Format(time.RFC3339), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ready")
		})
		hln, err := net.Listen("tcp", o.httpAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("ca serve: --http-addr %s: %w", o.httpAddr, err)
		}
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- hs.Serve(hln) }()
		defer hs.Close()
	}
	go func() { errc <- gs.Serve(ln) }()

	syncCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	synced := pods.WaitForSync(syncCtx)
	cancel()
	if !synced && ctx.Err() == nil {
		gs.Stop()
		return errors.New("ca serve: the pod informer did not sync in 2 minutes: check the API server and the CA's RBAC (pods get/list/watch)")
	}
	root := ca.Bundle().X509Authorities()[0]
	sum := sha256.Sum256(root.Raw)
	log.Info("CA service serving", "listen", ln.Addr().String(), "trust_domain", td.String(), "root", root.Subject.String(),
		"root_sha256", hex.EncodeToString(sum[:]), "serving_names", o.servingNames, "node_agents", o.nodeAgents, "audiences", o.audiences)
	select {
	case <-ctx.Done():
		log.Info("CA service stopping")
		done := make(chan struct{})
		go func() { gs.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			gs.Stop()
		}
		return nil
	case err := <-errc:
		gs.Stop()
		return fmt.Errorf("ca serve: %w", err)
	}
}
