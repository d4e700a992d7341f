package xds

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/warren-mesh/warren/pkg/config"
)

// Publisher receives each new snapshot; *store.Store implements it.
type Publisher interface {
	Publish(snap *config.Snapshot) uint64
}

// Netns is where a local workload's network namespace is, and its cgroup
// relative to the cgroup2 root (informational: capture keys on the network
// namespace).
type Netns struct {
	Path       string
	CgroupPath string
}

// PodRef names a pod of this node.
type PodRef struct{ Namespace, Name string }

// LocalPods finds the network namespaces of pods of this node. Pods it
// cannot find yet are absent from the result; they are asked for again.
type LocalPods interface {
	Resolve(pods []PodRef) (map[PodRef]Netns, error)
}

// Options configure a Provider.
type Options struct {
	// Address of istiod's xDS server (host:port). Required.
	Address string
	// TLS verifies istiod (the mesh root, its server name). Required unless
	// DialOptions carry transport credentials (tests).
	TLS *tls.Config
	// TokenFile holds the bearer token sent on every stream (the projected
	// ServiceAccount token, audience istio-ca); read at each stream.
	TokenFile string
	// Node is this node's name: workloads with this node are local.
	Node string
	// PodName, PodNamespace and InstanceIPs identify the agent's own pod in
	// the node ID (ztunnel~<ip>~<pod>.<ns>~<ns>.svc.<domain>).
	PodName, PodNamespace string
	InstanceIPs           []string
	// ClusterID is Istio's CLUSTER_ID ("" means Kubernetes).
	ClusterID string
	// Domain is the cluster DNS domain of the node ID ("" means cluster.local).
	Domain string
	// LocalPods resolves this node's pods; nil enrolls nothing.
	LocalPods LocalPods
	// Config checks snapshots (its Node is set to Node).
	Config config.Options
	// BackoffMin and BackoffMax bound the reconnect delay (0: 100 ms, 15 s).
	BackoffMin, BackoffMax time.Duration
	// RetryInterval re-resolves local pods still waiting for their network
	// namespace (0: 1 s).
	RetryInterval time.Duration
	// DialOptions are appended to the gRPC dial options.
	DialOptions []grpc.DialOption
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Status describes the provider for the admin API.
type Status struct {
	Address string `json:"address"`
	NodeID  string `json:"nodeId"`
	// Connected is true while a stream to istiod is open.
	Connected bool `json:"connected"`
	// Synced is true once istiod's first push of both types was applied.
	Synced     bool      `json:"synced"`
	Generation uint64    `json:"generation"`
	AppliedAt  time.Time `json:"appliedAt,omitzero"`
	Streams    int       `json:"streams"`
	Acks       int       `json:"acks"`
	Nacks      int       `json:"nacks"`
	// LastNack is the error detail of the latest NACK.
	LastNack  string   `json:"lastNack,omitempty"`
	Workloads int      `json:"workloads"`
	Services  int      `json:"services"`
	Policies  int      `json:"policies"`
	Enrolled  []string `json:"enrolled"`
	Waiting   []string `json:"waiting,omitempty"`
	// Notes are parts of resources this warren does not honour.
	Notes []string `json:"notes,omitempty"`
	// InvalidPolicyRules fail closed (package istioval).
	InvalidPolicyRules []string `json:"invalidPolicyRules,omitempty"`
	LastError          string   `json:"lastError,omitempty"`
}

// Provider is the istiod configuration provider. Create it with New and
// call Run.
type Provider struct {
	opts Options
	pub  Publisher
	log  *slog.Logger
	node *corev3.Node

	mu      sync.Mutex
	st      *state
	first   map[string]bool // type URL → first response of this stream seen
	synced  map[string]bool // type URL → first response ever applied
	netns   map[string]Netns
	waiting bool
	status  Status
	lastErr error
}

// New returns a provider.
func New(pub Publisher, opts Options) (*Provider, error) {
	if opts.Address == "" {
		return nil, errors.New("istiod provider: xDS address required")
	}
	if opts.Node == "" {
		return nil, errors.New("istiod provider: node name required")
	}
	if opts.Domain == "" {
		opts.Domain = "cluster.local"
	}
	if opts.ClusterID == "" {
		opts.ClusterID = "Kubernetes"
	}
	if opts.BackoffMin <= 0 {
		opts.BackoffMin = 100 * time.Millisecond
	}
	if opts.BackoffMax <= 0 {
		opts.BackoffMax = 15 * time.Second
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = time.Second
	}
	opts.Config.Node = opts.Node
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	p := &Provider{opts: opts, pub: pub, log: log.With("provider", "istiod", "node", opts.Node),
		st: newState(), synced: map[string]bool{}, netns: map[string]Netns{}}
	p.node = p.nodeProto()
	p.status.Address, p.status.NodeID = opts.Address, p.node.GetId()
	p.lastErr = fmt.Errorf("waiting for istiod's first push from %s", opts.Address)
	return p, nil
}

// NodeID is the xDS node ID, as ztunnel sends it.
func (p *Provider) NodeID() string { return p.node.GetId() }

func (p *Provider) nodeProto() *corev3.Node {
	ip := ""
	if len(p.opts.InstanceIPs) > 0 {
		ip = p.opts.InstanceIPs[0]
	}
	ns := p.opts.PodNamespace
	id := fmt.Sprintf("ztunnel~%s~%s.%s~%s.svc.%s", ip, p.opts.PodName, ns, ns, p.opts.Domain)
	meta := map[string]any{
		"NAME": p.opts.PodName, "NAMESPACE": ns, "INSTANCE_IPS": strings.Join(p.opts.InstanceIPs, ","),
		"NODE_NAME": p.opts.Node, "CLUSTER_ID": p.opts.ClusterID,
	}
	s, _ := structpb.NewStruct(meta) // strings only: cannot fail
	return &corev3.Node{Id: id, Metadata: s}
}

// LastError is why the configuration is not (yet) what istiod says, or nil.
func (p *Provider) LastError() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastErr
}

// Status returns the provider's state.
func (p *Provider) Status() any {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.status
	s.Enrolled = append([]string{}, s.Enrolled...)
	return s
}

// bearer sends the token file's current content on every stream.
type bearer struct{ file string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	if b.file == "" {
		return nil, nil
	}
	t, err := os.ReadFile(b.file)
	if err != nil {
		return nil, fmt.Errorf("read the xDS token: %w", err)
	}
	return map[string]string{"authorization": "Bearer " + strings.TrimSpace(string(t))}, nil
}

func (b bearer) RequireTransportSecurity() bool { return false }

// Run keeps a delta ADS stream to istiod open until ctx ends, reconnecting
// with exponential backoff; the last applied configuration stays published
// while istiod is away. It returns ctx.Err().
func (p *Provider) Run(ctx context.Context) error {
	dial := []grpc.DialOption{grpc.WithPerRPCCredentials(bearer{p.opts.TokenFile})}
	if p.opts.TLS != nil {
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(p.opts.TLS)))
	}
	dial = append(dial, p.opts.DialOptions...)
	conn, err := grpc.NewClient(p.opts.Address, dial...)
	if err != nil {
		return fmt.Errorf("istiod provider: dial %s: %w", p.opts.Address, err)
	}
	defer conn.Close()
	go p.retryLoop(ctx)
	client := discoveryv3.NewAggregatedDiscoveryServiceClient(conn)
	backoff := p.opts.BackoffMin
	for {
		start := time.Now()
		err := p.stream(ctx, client)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Since(start) > 30*time.Second {
			backoff = p.opts.BackoffMin
		}
		p.mu.Lock()
		p.status.Connected = false
		if !p.status.Synced {
			p.lastErr = fmt.Errorf("waiting for istiod's first push from %s: %w", p.opts.Address, err)
		}
		p.status.LastError = err.Error()
		p.mu.Unlock()
		p.log.Warn("xDS stream to istiod ended; keeping the last configuration", "addr", p.opts.Address, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, p.opts.BackoffMax)
	}
}

// stream runs one delta ADS stream until it fails.
func (p *Provider) stream(ctx context.Context, client discoveryv3.AggregatedDiscoveryServiceClient) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := client.DeltaAggregatedResources(ctx)
	if err != nil {
		return fmt.Errorf("open delta ADS stream: %w", err)
	}
	p.mu.Lock()
	p.first = map[string]bool{}
	p.status.Streams++
	p.mu.Unlock()
	for _, t := range []string{AddressType, AuthorizationType} {
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: p.node, TypeUrl: t}); err != nil {
			return fmt.Errorf("subscribe to %s: %w", t, err)
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		p.mu.Lock()
		p.status.Connected = true
		p.mu.Unlock()
		detail := p.handle(resp)
		req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}
		if detail != "" {
			req.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: detail}
		}
		if err := s.Send(req); err != nil {
			return fmt.Errorf("send ACK/NACK: %w", err)
		}
	}
}

// handle applies one response and returns the NACK detail ("" to ACK).
// Every resource that converts and keeps the whole configuration valid is
// applied; the others are rejected and their previous versions (or their
// absence) stay. The first response of each type on a stream is istiod's
// whole state of that type: names it does not list are removed.
func (p *Provider) handle(resp *discoveryv3.DeltaDiscoveryResponse) string {
	t := resp.GetTypeUrl()
	p.mu.Lock()
	defer p.mu.Unlock()
	if t != AddressType && t != AuthorizationType {
		p.status.Nacks++
		p.status.LastNack = "type " + t + " is not subscribed"
		return p.status.LastNack
	}
	var changes []change
	var rejected []rejection
	seen := map[string]bool{}
	for _, r := range resp.GetResources() {
		seen[r.GetName()] = true
		e, err := decode(t, r.GetName(), r.GetVersion(), r.GetResource())
		if err != nil {
			rejected = append(rejected, rejection{t, r.GetName(), err.Error()})
			continue
		}
		changes = append(changes, change{typeURL: t, name: r.GetName(), e: e})
	}
	for _, n := range resp.GetRemovedResources() {
		changes = append(changes, change{typeURL: t, name: n})
	}
	if !p.first[t] {
		p.first[t] = true
		for _, n := range sortedKeys(p.st.res[t]) {
			if !seen[n] {
				changes = append(changes, change{typeURL: t, name: n})
			}
		}
	}
	next := p.st.clone()
	next.apply(changes)
	b, snap, err := p.snapshot(next)
	if err != nil {
		// Find the changes that break the configuration, one by one, on top
		// of what is applied: the error path, O(changes × mesh).
		next = p.st.clone()
		for _, c := range changes {
			try := next.clone()
			try.apply([]change{c})
			if _, _, err := p.snapshot(try); err != nil {
				rejected = append(rejected, rejection{t, c.name, err.Error()})
				continue
			}
			next = try
		}
		b, snap, err = p.snapshot(next)
		if err != nil { // cannot happen: next was valid at its last step
			rejected = append(rejected, rejection{t, "*", err.Error()})
			next = p.st
		}
	}
	p.st = next
	p.synced[t] = true
	if snap != nil {
		p.publish(b, snap)
	}
	if len(rejected) > 0 {
		p.status.Nacks++
		p.status.LastNack = joinRejections(rejected)
		p.log.Error("NACK: resources from istiod not applied; their previous state stays", "type", t, "nonce", resp.GetNonce(), "rejected", p.status.LastNack)
		return p.status.LastNack
	}
	p.status.Acks++
	p.log.Debug("ACK", "type", t, "nonce", resp.GetNonce(), "resources", len(resp.GetResources()), "removed", len(resp.GetRemovedResources()))
	return ""
}

// snapshot builds and validates next. Called with mu held.
func (p *Provider) snapshot(next *state) (built, *config.Snapshot, error) {
	b := next.build(p.opts.Node, p.resolve)
	snap, err := config.NewSnapshot(b.cfg, p.opts.Config)
	return b, snap, err
}

// publish publishes snap once both types have had their first push.
// Called with mu held.
func (p *Provider) publish(b built, snap *config.Snapshot) {
	if !p.synced[AddressType] || !p.synced[AuthorizationType] {
		return
	}
	gen := p.pub.Publish(snap)
	s := &p.status
	if !s.Synced {
		p.log.Info("first configuration from istiod applied", "workloads", len(b.cfg.Workloads), "services", len(b.cfg.Services), "policies", len(b.cfg.Policies))
	}
	s.Synced, s.Generation, s.AppliedAt = true, gen, time.Now()
	s.Workloads, s.Services, s.Policies = len(b.cfg.Workloads), len(b.cfg.Services), len(b.cfg.Policies)
	s.Enrolled, s.Waiting, s.Notes = b.enrolled, b.waiting, b.notes
	s.InvalidPolicyRules = nil
	for _, ap := range b.cfg.Policies {
		for _, why := range ap.Invalid {
			s.InvalidPolicyRules = append(s.InvalidPolicyRules, ap.Key()+": "+why)
		}
	}
	p.waiting = len(b.waiting) > 0
	p.lastErr = nil
	if p.waiting {
		p.lastErr = fmt.Errorf("network namespace not found yet for %v", b.waiting)
	}
}

// resolve finds local mesh workloads' network namespaces, cached by
// workload UID and rechecked at every build. Called with mu held.
func (p *Provider) resolve(ws []*config.Workload) map[string]Netns {
	out := map[string]Netns{}
	var missing []PodRef
	byRef := map[PodRef]string{}
	check := p.opts.Config.CheckNetns
	if check == nil {
		check = config.CheckNetnsPath
	}
	for _, w := range ws {
		if n, ok := p.netns[w.UID]; ok && check(n.Path) == nil {
			out[w.UID] = n
			continue
		}
		delete(p.netns, w.UID)
		ref := PodRef{Namespace: w.Namespace, Name: w.Name}
		missing = append(missing, ref)
		byRef[ref] = w.UID
	}
	if len(missing) == 0 || p.opts.LocalPods == nil {
		return out
	}
	found, err := p.opts.LocalPods.Resolve(missing)
	if err != nil {
		p.log.Warn("resolve local pods' network namespaces", "err", err)
	}
	for ref, n := range found {
		if uid, ok := byRef[ref]; ok {
			p.netns[uid] = n
			out[uid] = n
		}
	}
	return out
}

// retryLoop rebuilds while local pods wait for their network namespace.
func (p *Provider) retryLoop(ctx context.Context) {
	t := time.NewTicker(p.opts.RetryInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p.mu.Lock()
		if p.waiting {
			if b, snap, err := p.snapshot(p.st); err == nil {
				p.publish(b, snap)
			} else {
				p.log.Warn("rebuild for waiting pods", "err", err)
			}
		}
		p.mu.Unlock()
	}
}
