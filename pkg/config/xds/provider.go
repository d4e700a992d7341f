package xds

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
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

	mu sync.Mutex
	// snap is the applied state: what istiod sent and warren applied,
	// published once both types have synced. It is the provider's only copy
	// of the mesh; holds and notes keep what it cannot say.
	snap    *config.Snapshot
	holds   holds
	notes   map[string][]string // resource name → parts not honoured
	first   map[string]bool     // type URL → first response of this stream seen
	synced  map[string]bool     // type URL → first response ever applied
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
		holds: newHolds(), notes: map[string][]string{}, synced: map[string]bool{}, netns: map[string]Netns{}}
	var err error
	if p.snap, err = config.NewSnapshot(config.Config{}, opts.Config); err != nil {
		return nil, fmt.Errorf("istiod provider: %w", err) // an empty configuration has nothing to reject
	}
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
	s.Enrolled = []string{}
	if s.Synced {
		for _, w := range p.snap.EnrolledWorkloads() {
			s.Enrolled = append(s.Enrolled, w.Namespace+"/"+w.Name)
		}
	}
	s.Waiting = slices.Clone(s.Waiting)
	for _, name := range slices.Sorted(maps.Keys(p.notes)) {
		for _, n := range p.notes[name] {
			s.Notes = append(s.Notes, name+": "+n)
		}
	}
	var trimmed []string
	for uid, h := range p.holds.byUID {
		if len(h.missing) > 0 {
			trimmed = append(trimmed, uid+": references not (yet) received are ignored: "+strings.Join(h.missing, ", "))
		}
	}
	slices.Sort(trimmed)
	s.Notes = append(s.Notes, trimmed...)
	if s.Synced {
		for _, ap := range p.snap.Policies() {
			for _, why := range ap.Invalid {
				s.InvalidPolicyRules = append(s.InvalidPolicyRules, ap.Key()+": "+why)
			}
		}
	}
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
// Every resource that converts and fits the applied configuration is
// applied; the others are rejected and their previous versions (or their
// absence) stay. The first response of each type on a stream is istiod's
// whole state of that type: names it does not list are removed.
//
// A response is applied to the current snapshot with config.Snapshot.Apply
// (in up to three steps, published once): O(resources in the response)
// plus what they invalidate, not O(mesh); only the first response of a
// stream walks the whole state, to find what it no longer lists.
func (p *Provider) handle(resp *discoveryv3.DeltaDiscoveryResponse) string {
	t := resp.GetTypeUrl()
	p.mu.Lock()
	defer p.mu.Unlock()
	if t != AddressType && t != AuthorizationType {
		p.status.Nacks++
		p.status.LastNack = "type " + t + " is not subscribed"
		return p.status.LastNack
	}
	var rejected []rejection
	var decoded []named
	seen := map[string]bool{}
	for _, r := range resp.GetResources() {
		seen[r.GetName()] = true
		e, err := decode(t, r.GetName(), r.GetResource())
		if err != nil {
			rejected = append(rejected, rejection{t, r.GetName(), err.Error()})
			continue
		}
		decoded = append(decoded, named{r.GetName(), e})
	}
	removed := resp.GetRemovedResources()
	if !p.first[t] {
		p.first[t] = true
		removed = append(slices.Clip(removed), p.unlisted(t, seen)...)
	}
	var changed bool
	if t == AddressType {
		changed = p.applyAddresses(decoded, removed, &rejected)
	} else {
		changed = p.applyAuthorizations(decoded, removed, &rejected)
	}
	bad := map[string]bool{}
	for _, r := range rejected {
		bad[r.name] = true
	}
	for _, d := range decoded {
		if bad[d.name] {
			continue
		}
		if len(d.e.notes) > 0 {
			p.notes[d.name] = d.e.notes
		} else {
			delete(p.notes, d.name)
		}
	}
	for _, n := range removed {
		if !bad[n] {
			delete(p.notes, n)
		}
	}
	p.synced[t] = true
	p.publish(changed)
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

// named is a decoded resource and its xDS name.
type named struct {
	name string
	e    *entry
}

// unlisted returns the names of type t the applied state holds and seen
// does not: O(state of that type), on a stream's first response only.
func (p *Provider) unlisted(t string, seen map[string]bool) []string {
	var out []string
	if t == AuthorizationType {
		for _, ap := range p.snap.Policies() {
			if !seen[ap.Key()] {
				out = append(out, ap.Key())
			}
		}
		return out
	}
	p.snap.RangeWorkloads(func(w *config.Workload) bool {
		if !seen[w.UID] {
			out = append(out, w.UID)
		}
		return true
	})
	for _, svc := range p.snap.Services() {
		if k := svc.Key().String(); !seen[k] {
			out = append(out, k)
		}
	}
	return out
}

// applyAddresses applies the workloads and services of a response, and the
// removal of names, to the applied state: services first (so that the
// response's workloads may refer to them), then workloads — the response's,
// those that waited for one of its services, and those whose service it
// removes (their reference goes first) — with the removals. It reports
// whether anything applied. Called with mu held.
func (p *Provider) applyAddresses(decoded []named, removed []string, rejected *[]rejection) bool {
	cur := p.snap
	var ws []*config.Workload
	var svcs []*config.Service
	for _, d := range decoded {
		if d.e.workload != nil {
			ws = append(ws, d.e.workload)
		} else {
			svcs = append(svcs, d.e.service)
		}
	}
	var d config.Delta
	gone := map[string]bool{}
	for _, name := range removed {
		if _, ok := cur.WorkloadByUID(name); ok {
			d.RemovedWorkloads = append(d.RemovedWorkloads, name)
		} else if k, err := config.ParseNamespacedHostname(name); err == nil {
			if _, ok := cur.ServiceByKey(k); ok {
				d.RemovedServices = append(d.RemovedServices, k)
				gone[serviceRef(k)] = true
			}
		}
	}
	changed := false
	if len(svcs) > 0 {
		var ok bool
		cur, ok = p.applyStep(cur, nil, nil, config.Delta{Services: svcs}, AddressType, rejected)
		changed = changed || ok
	}
	// The response's workloads win over the held versions of the same UIDs.
	in := make(map[string]bool, len(ws)+len(d.RemovedWorkloads))
	for _, w := range ws {
		in[w.UID] = true
	}
	for _, uid := range d.RemovedWorkloads {
		in[uid] = true
	}
	add := func(w *config.Workload) {
		if !in[w.UID] {
			in[w.UID] = true
			ws = append(ws, w)
		}
	}
	for _, svc := range svcs {
		for _, w := range p.holds.waiters(serviceRef(svc.Key())) {
			add(w)
		}
	}
	for _, k := range d.RemovedServices {
		if svc, ok := cur.ServiceByKey(k); ok {
			for _, ep := range cur.Endpoints(svc) {
				add(p.holds.sent(ep.Workload))
			}
		}
	}
	var ok bool
	cur, ok = p.applyStep(cur, ws, gone, d, AddressType, rejected)
	p.snap = cur
	return changed || ok
}

// applyAuthorizations applies the policies of a response and the removal
// of names: first the workloads listing a policy that goes or leaves the
// WorkloadSelector scope lose that reference (found by a walk of the
// workloads, only when some do), then the policies, then the workloads
// that waited for one of them get it. It reports whether anything applied.
// Called with mu held.
func (p *Provider) applyAuthorizations(decoded []named, removed []string, rejected *[]rejection) bool {
	cur := p.snap
	var d config.Delta
	gone := map[string]bool{}
	for _, x := range decoded {
		d.Policies = append(d.Policies, x.e.policy)
		if k := x.e.policy.Key(); x.e.policy.Scope != config.ScopeWorkloadSelector && cur.PolicyRefs(k) > 0 {
			gone[policyRef(k)] = true
		}
	}
	for _, name := range removed {
		if _, ok := cur.Policy(name); ok {
			d.RemovedPolicies = append(d.RemovedPolicies, name)
			if cur.PolicyRefs(name) > 0 {
				gone[policyRef(name)] = true
			}
		}
	}
	changed := false
	if len(gone) > 0 {
		var ws []*config.Workload
		cur.RangeWorkloads(func(w *config.Workload) bool {
			for _, ref := range w.AuthorizationPolicies {
				if gone[policyRef(ref)] {
					ws = append(ws, p.holds.sent(w))
					break
				}
			}
			return true
		})
		var ok bool
		cur, ok = p.applyStep(cur, ws, gone, config.Delta{}, AuthorizationType, rejected)
		changed = changed || ok
	}
	var ok bool
	cur, ok = p.applyStep(cur, nil, nil, d, AuthorizationType, rejected)
	changed = changed || ok
	var ws []*config.Workload
	for _, ap := range d.Policies {
		ws = append(ws, p.holds.waiters(policyRef(ap.Key()))...)
	}
	if len(ws) > 0 {
		cur, ok = p.applyStep(cur, ws, nil, config.Delta{}, AuthorizationType, rejected)
		changed = changed || ok
	}
	p.snap = cur
	return changed
}

// applyStep derives ws (workloads as istiod sent them) against cur, applies
// them with d and records what it holds about those applied. It returns
// the new snapshot and whether anything applied; rejected items keep their
// previous version. Called with mu held.
func (p *Provider) applyStep(cur *config.Snapshot, ws []*config.Workload, gone map[string]bool, d config.Delta, t string, rejected *[]rejection) (*config.Snapshot, bool) {
	var locals []*config.Workload
	for _, w := range ws {
		if w.Node == p.opts.Node && w.InMesh() {
			locals = append(locals, w)
		}
	}
	var found map[string]Netns
	if len(locals) > 0 {
		found = p.resolve(locals)
	}
	hs := make([]*held, len(ws))
	d.Workloads = slices.Grow(d.Workloads, len(ws))
	for i, w := range ws {
		var dw *config.Workload
		dw, hs[i] = derive(w, cur, gone, p.opts.Node, found)
		d.Workloads = append(d.Workloads, dw)
	}
	if d.Len() == 0 {
		return cur, false
	}
	next, rj := cur.Apply(d)
	var bad map[string]bool
	for _, r := range rj {
		*rejected = append(*rejected, rejection{t, r.Key, r.Err.Error()})
		if r.Kind == "workload" {
			if bad == nil {
				bad = map[string]bool{}
			}
			bad[r.Key] = true
		}
	}
	for i, w := range ws {
		if !bad[w.UID] {
			p.holds.unhold(w.UID)
			if hs[i] != nil {
				p.holds.hold(w.UID, hs[i])
			}
		}
	}
	for _, uid := range d.RemovedWorkloads {
		if !bad[uid] {
			p.holds.unhold(uid)
			delete(p.netns, uid)
		}
	}
	return next, len(rj) < d.Len()
}

// publish publishes the applied state once both types have had their
// first push, when it changed (or was never published). Called with mu
// held.
func (p *Provider) publish(changed bool) {
	if !p.synced[AddressType] || !p.synced[AuthorizationType] || (!changed && p.status.Synced) {
		return
	}
	snap := p.snap
	gen := p.pub.Publish(snap)
	s := &p.status
	if !s.Synced {
		p.log.Info("first configuration from istiod applied", "workloads", snap.NumWorkloads(), "services", snap.NumServices(), "policies", len(snap.Policies()))
	}
	s.Synced, s.Generation, s.AppliedAt = true, gen, time.Now()
	s.Workloads, s.Services, s.Policies = snap.NumWorkloads(), snap.NumServices(), len(snap.Policies())
	// Enrolled is listed by Status; the waiting ones here (readiness says
	// which), without building a string per local workload per push.
	s.Waiting = nil
	for _, w := range snap.LocalWorkloads() {
		if h := p.holds.byUID[w.UID]; h != nil && h.waiting {
			s.Waiting = append(s.Waiting, w.Namespace+"/"+w.Name)
		}
	}
	p.waiting = len(s.Waiting) > 0
	p.lastErr = nil
	if p.waiting {
		p.lastErr = fmt.Errorf("network namespace not found yet for %v", s.Waiting)
	}
}

// resolve finds local mesh workloads' network namespaces, cached by
// workload UID and rechecked at every call. Called with mu held.
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

// retryLoop re-resolves this node's mesh workloads every RetryInterval and
// applies those whose network namespace was found, moved or went away.
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
		p.recheckLocal()
		p.mu.Unlock()
	}
}

// recheckLocal applies the local mesh workloads whose network namespace
// differs from the applied one: O(local workloads). Called with mu held.
func (p *Provider) recheckLocal() {
	if !p.status.Synced {
		return
	}
	var locals []*config.Workload
	for _, w := range p.snap.LocalWorkloads() {
		if h := p.holds.byUID[w.UID]; h != nil && h.sent.InMesh() {
			locals = append(locals, h.sent)
		}
	}
	if len(locals) == 0 {
		return
	}
	found := p.resolve(locals)
	var redo []*config.Workload
	for _, w := range locals {
		cur, _ := p.snap.WorkloadByUID(w.UID)
		ns, ok := found[w.UID]
		if ok != cur.InMesh() || (ok && ns.Path != cur.NetnsPath()) {
			redo = append(redo, w)
		}
	}
	if len(redo) == 0 {
		return
	}
	var rejected []rejection
	next, changed := p.applyStep(p.snap, redo, nil, config.Delta{}, AddressType, &rejected)
	if len(rejected) > 0 {
		p.log.Warn("local workloads with a new network namespace not applied", "rejected", joinRejections(rejected))
	}
	p.snap = next
	p.publish(changed)
}
