package caserver

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/istioca"
)

// Defaults of Options.
const (
	DefaultMaxTTL = 24 * time.Hour
	// DefaultRate and DefaultBurst bound each caller: a node agent starting
	// with 50 identities gets them at once, then 5 a second.
	DefaultRate  = 5
	DefaultBurst = 50
)

// Options configure a Server.
type Options struct {
	// CA signs the certificates. Required.
	CA *builtinca.CA
	// Kube reviews tokens (TokenReview create). Required.
	Kube kubernetes.Interface
	// Pods is the pod index the Authorizer reads; it must be started. Required.
	Pods *PodIndex
	// Audiences are the token audiences accepted; DefaultAudience when empty.
	Audiences []string
	// NodeAgents are the ServiceAccounts allowed to impersonate the pods of
	// their node.
	NodeAgents []types.NamespacedName
	// MaxTTL caps the validity of issued certificates; DefaultMaxTTL when zero.
	MaxTTL time.Duration
	// Rate and Burst are each caller's token bucket (requests per second,
	// bucket size); DefaultRate and DefaultBurst when zero, unlimited when
	// Rate is negative.
	Rate  float64
	Burst int
	// Registry receives the metrics; none when nil.
	Registry prometheus.Registerer
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Now defaults to time.Now.
	Now func() time.Time
}

// Server implements IstioCertificateService.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer

	ca      *builtinca.CA
	authn   *Authenticator
	authz   *Authorizer
	pods    *PodIndex
	limit   *limiter
	maxTTL  time.Duration
	log     *slog.Logger
	now     func() time.Time
	issued  prometheus.Counter
	refused *prometheus.CounterVec
	latency prometheus.Histogram
}

// New returns a Server; register it on a gRPC server with
// pb.RegisterIstioCertificateServiceServer, served with ServingCert's TLS.
func New(o Options) (*Server, error) {
	switch {
	case o.CA == nil:
		return nil, errors.New("CA server: no CA (load it with builtinca.LoadDir)")
	case o.Kube == nil:
		return nil, errors.New("CA server: no Kubernetes client to review tokens")
	case o.Pods == nil:
		return nil, errors.New("CA server: no pod index")
	}
	if o.MaxTTL <= 0 {
		o.MaxTTL = DefaultMaxTTL
	}
	r, b := rate.Limit(o.Rate), o.Burst
	switch {
	case o.Rate < 0:
		r = rate.Inf
	case o.Rate == 0:
		r = DefaultRate
	}
	if b <= 0 {
		b = DefaultBurst
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	s := &Server{
		ca: o.CA, authn: NewAuthenticator(o.Kube, o.Audiences), authz: NewAuthorizer(o.CA.TrustDomain(), o.Pods, o.NodeAgents),
		pods: o.Pods, limit: newLimiter(r, b), maxTTL: o.MaxTTL, log: o.Logger, now: o.Now,
		issued: prometheus.NewCounter(prometheus.CounterOpts{Name: "warren_ca_certificates_issued_total",
			Help: "Workload certificates the CA service signed."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "warren_ca_requests_refused_total",
			Help: "CreateCertificate requests the CA service refused, by reason."}, []string{"reason"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "warren_ca_request_duration_seconds",
			Help:    "Time to answer CreateCertificate (token review, authorization, signing), issued or refused.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
	}
	for _, r := range Reasons {
		s.refused.WithLabelValues(r)
	}
	if o.Registry != nil {
		for _, c := range []prometheus.Collector{s.issued, s.refused, s.latency} {
			if err := o.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("CA server: register metrics: %w", err)
			}
		}
	}
	return s, nil
}

// Ready reports whether the server can decide requests: the pod index has
// its first list and the CA can sign.
func (s *Server) Ready() error {
	if !s.pods.Synced() {
		return errors.New("pod index not synced with the API server yet")
	}
	return nil
}

// CreateCertificate authenticates, rate-limits and authorizes the caller,
// then signs the CSR. See the package documentation.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	start := s.now()
	resp, c, id, err := s.create(ctx, req)
	s.latency.Observe(s.now().Sub(start).Seconds())
	if err != nil {
		var r *Refusal
		if !errors.As(err, &r) {
			r = &Refusal{Code: codes.Internal, Reason: ReasonSignFailed, Message: err.Error()}
		}
		s.refused.WithLabelValues(r.Reason).Inc()
		from := ""
		if p, ok := peer.FromContext(ctx); ok {
			from = p.Addr.String()
		}
		s.log.Info("certificate refused", "reason", r.Reason, "caller", c.String(), "identity", id, "peer", from, "message", r.Message)
		return nil, r.GRPCStatus().Err()
	}
	s.issued.Inc()
	s.log.Debug("certificate issued", "caller", c.String(), "identity", id)
	return resp, nil
}

func (s *Server) create(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, Caller, string, error) {
	token, err := bearerToken(ctx)
	if err != nil {
		return nil, Caller{}, "", refuse(codes.Unauthenticated, ReasonNoToken, "%v: send the projected ServiceAccount token as \"authorization: Bearer <token>\"", err)
	}
	c, err := s.authn.Authenticate(ctx, token)
	if err != nil {
		return nil, c, "", err
	}
	node, err := s.authz.Node(c)
	if err != nil {
		return nil, c, "", err
	}
	// One bucket per ServiceAccount and node: a node agent's restarts and
	// its pods share their node's budget.
	if ok, wait := s.limit.allow(c.Namespace+"/"+c.ServiceAccount+"@"+node, s.now()); !ok {
		return nil, c, "", refuse(codes.ResourceExhausted, ReasonRateLimited, "caller %s on node %s is over its rate limit: retry in %v", c, node, wait.Round(time.Millisecond))
	}
	// The identity asked for: impersonated, else the caller's own.
	var id identity.Identity
	if v, ok := req.GetMetadata().GetFields()[istioca.ImpersonatedIdentityKey]; ok {
		if id, err = identity.Parse(v.GetStringValue()); err != nil {
			return nil, c, v.GetStringValue(), refuse(codes.InvalidArgument, ReasonBadIdentity, "%s %q: %v (want spiffe://<trust domain>/ns/<namespace>/sa/<service account>)", istioca.ImpersonatedIdentityKey, v.GetStringValue(), err)
		}
	} else if id, err = identity.New(s.ca.TrustDomain().Name(), c.Namespace, c.ServiceAccount); err != nil {
		return nil, c, "", refuse(codes.InvalidArgument, ReasonBadIdentity, "the caller's identity: %v", err)
	}
	if err := s.authz.Authorize(c, node, id); err != nil {
		return nil, c, id.String(), err
	}
	csr, err := parseCSR(req.GetCsr(), id.SPIFFEID())
	if err != nil {
		return nil, c, id.String(), err
	}
	ttl := s.maxTTL
	if d := time.Duration(req.GetValidityDuration()) * time.Second; d > 0 && d < ttl {
		ttl = d
	}
	chain, err := s.ca.Issue(csr.PublicKey, id, ttl)
	if err != nil {
		return nil, c, id.String(), refuse(codes.Internal, ReasonSignFailed, "sign %s: %v", id, err)
	}
	out := make([]string, 0, len(chain)+1)
	for _, x := range chain {
		out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: x.Raw})))
	}
	for _, r := range s.ca.Bundle().X509Authorities() {
		out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})))
	}
	return &pb.IstioCertificateResponse{CertChain: out}, c, id.String(), nil
}

// parseCSR checks that csrPEM is one CSR signed by its key whose only SAN is want.
func parseCSR(csrPEM string, want spiffeid.ID) (*x509.CertificateRequest, error) {
	block, _ := pem.Decode([]byte(csrPEM))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, refuse(codes.InvalidArgument, ReasonBadCSR, "csr: no PEM CERTIFICATE REQUEST block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, refuse(codes.InvalidArgument, ReasonBadCSR, "csr: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse(codes.InvalidArgument, ReasonBadCSR, "csr: signature: %v", err)
	}
	if len(csr.URIs) != 1 || csr.URIs[0].String() != want.String() || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return nil, refuse(codes.InvalidArgument, ReasonBadCSR, "csr: its SANs must be exactly the URI %s (got URIs %v, DNS %v, IPs %v)", want, csr.URIs, csr.DNSNames, csr.IPAddresses)
	}
	return csr, nil
}

// bearerToken reads "authorization: Bearer <token>" from the request metadata.
func bearerToken(ctx context.Context) (string, error) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return "", errNoBearer
	}
	v := md.Get("authorization")
	if len(v) != 1 {
		return "", errNoBearer
	}
	scheme, tok, ok := strings.Cut(v[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
		return "", errNoBearer
	}
	return strings.TrimSpace(tok), nil
}
