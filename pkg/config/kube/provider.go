package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"sort"
	"sync"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/warren-mesh/warren/pkg/config"
)

// Publisher receives each new snapshot; *store.Store implements it.
type Publisher interface {
	Publish(snap *config.Snapshot) uint64
}

// Resolver finds local pods' network namespaces by pod UID; ProcResolver
// is the production one. Pods it cannot find yet are left out of the result.
type Resolver interface {
	Resolve(uids []string) (map[string]Netns, error)
}

// Options configure a Provider. Only Node is required.
type Options struct {
	// Node is this node's name (spec.nodeName of its pods).
	Node string
	// TrustDomain of workload identities; "" means config.DefaultTrustDomain.
	TrustDomain string
	// ClusterID prefixes workload UIDs; "" means DefaultClusterID.
	ClusterID string
	// Domain is the cluster DNS domain; "" means DefaultDomain.
	Domain string
	// RootNamespace holds mesh-wide policies; "" means DefaultRootNamespace.
	RootNamespace string
	// EnrollLabel and EnrollValue select enrolled namespaces; "" means
	// DefaultEnrollLabel and DefaultEnrollValue. A pod with EnrollLabel=none opts out.
	EnrollLabel, EnrollValue string
	// Resolver finds network namespaces; nil means ProcResolver{} (host /proc).
	Resolver Resolver
	// NoAnnotate leaves pods unannotated (read-only RBAC).
	NoAnnotate bool
	// Config checks snapshots (its Node is set to Node).
	Config config.Options
	// Debounce gathers bursts of events into one batch (one delta); 0 means 100 ms.
	Debounce time.Duration
	// RetryInterval re-resolves pods still waiting for their namespace and
	// retries failed annotations; 0 means 1 s.
	RetryInterval time.Duration
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Provider watches the API server and publishes the model of the cluster as
// seen from one node. Create it with New and call Run.
type Provider struct {
	kube  kubernetes.Interface
	istio istioclient.Interface
	pub   Publisher
	opts  Options
	log   *slog.Logger
	conv  convertOptions

	kick chan struct{}

	events *events // recorded by the informers' handlers

	// Owned by the Run goroutine.
	netns map[string]Netns // pod UID → namespace, verified each batch
	model model

	mu     sync.Mutex
	status Status
}

// Status describes the provider for the admin API.
type Status struct {
	Node string `json:"node"`
	// Synced is true once every informer has listed its objects.
	Synced bool `json:"synced"`
	// Loaded is true once a snapshot has been published.
	Loaded     bool      `json:"loaded"`
	Generation uint64    `json:"generation"`
	AppliedAt  time.Time `json:"appliedAt,omitzero"`
	// Enrolled are local pods in the mesh ("namespace/name").
	Enrolled []string `json:"enrolled"`
	// Waiting are local pods that belong in the mesh but whose network
	// namespace is not found yet.
	Waiting []string `json:"waiting,omitempty"`
	// Skipped are objects left out of the model, with the reason.
	Skipped []string `json:"skipped,omitempty"`
	// InvalidPolicyRules are AuthorizationPolicy rules that hold a value
	// that cannot be parsed ("namespace/name: rules[i]: why"); they fail
	// closed (package istioval).
	InvalidPolicyRules []string `json:"invalidPolicyRules,omitempty"`
	// IstioPolicies is false when the security.istio.io/v1 API is not served.
	IstioPolicies bool   `json:"istioPolicies"`
	LastError     string `json:"lastError,omitempty"`
}

// New returns a provider. istio may be nil: policies are then not watched.
func New(kube kubernetes.Interface, istio istioclient.Interface, pub Publisher, opts Options) (*Provider, error) {
	if opts.Node == "" {
		return nil, errors.New("kubernetes provider: node name required")
	}
	def := func(s *string, d string) {
		if *s == "" {
			*s = d
		}
	}
	def(&opts.TrustDomain, config.DefaultTrustDomain)
	def(&opts.ClusterID, DefaultClusterID)
	def(&opts.Domain, DefaultDomain)
	def(&opts.RootNamespace, DefaultRootNamespace)
	def(&opts.EnrollLabel, DefaultEnrollLabel)
	def(&opts.EnrollValue, DefaultEnrollValue)
	if opts.Resolver == nil {
		opts.Resolver = ProcResolver{}
	}
	if opts.Debounce <= 0 {
		opts.Debounce = 100 * time.Millisecond
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = time.Second
	}
	opts.Config.Node = opts.Node
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	p := &Provider{
		kube: kube, istio: istio, pub: pub, opts: opts,
		log:    log.With("provider", "kubernetes", "node", opts.Node),
		kick:   make(chan struct{}, 1),
		netns:  map[string]Netns{},
		events: &events{root: opts.RootNamespace, label: opts.EnrollLabel, value: opts.EnrollValue},
	}
	p.conv = convertOptions{
		node: opts.Node, trustDomain: opts.TrustDomain, clusterID: opts.ClusterID, domain: opts.Domain,
		rootNamespace: opts.RootNamespace, label: opts.EnrollLabel, value: opts.EnrollValue,
		netns: func(pod *corev1.Pod) (Netns, bool) { n, ok := p.netns[string(pod.UID)]; return n, ok },
	}
	p.model.conv = p.conv
	p.status.Node = opts.Node
	p.status.LastError = "waiting for the API server: informers not synced yet (is it reachable, and does the RBAC allow list/watch?)"
	return p, nil
}

// Run starts the informers, publishes the first model once they have synced
// (a full conversion), then applies each debounced batch of events as a
// delta (see the package doc, Incremental updates) until ctx ends; it
// returns ctx.Err(), or an error if the informers cannot start.
func (p *Provider) Run(ctx context.Context) error {
	cluster := informers.NewSharedInformerFactoryWithOptions(p.kube, 0,
		informers.WithTransform(func(obj any) (any, error) {
			if pod, ok := obj.(*corev1.Pod); ok {
				return slimPod(pod), nil
			}
			return obj, nil
		}))
	local := informers.NewSharedInformerFactoryWithOptions(p.kube, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", p.opts.Node).String()
		}))
	nsInf := cluster.Core().V1().Namespaces().Informer()
	podInf := cluster.Core().V1().Pods().Informer()
	svcInf := cluster.Core().V1().Services().Informer()
	esInf := cluster.Discovery().V1().EndpointSlices().Informer()
	localInf := local.Core().V1().Pods().Informer()
	infs := []cache.SharedIndexInformer{nsInf, podInf, svcInf, esInf, localInf}
	var apInf, paInf cache.SharedIndexInformer

	var istioFactory istioinformers.SharedInformerFactory
	if p.istio != nil && p.istioServed() {
		istioFactory = istioinformers.NewSharedInformerFactory(p.istio, 0)
		apInf = istioFactory.Security().V1().AuthorizationPolicies().Informer()
		paInf = istioFactory.Security().V1().PeerAuthentications().Informer()
		infs = append(infs, apInf, paInf)
		p.setStatus(func(s *Status) { s.IstioPolicies = true })
	} else {
		p.log.Warn("security.istio.io/v1 is not served: AuthorizationPolicy and PeerAuthentication are not enforced (install Istio's CRDs and restart the agent)")
	}
	for _, inf := range []cache.SharedIndexInformer{podInf, localInf, apInf, paInf} {
		if inf == nil {
			continue
		}
		if _, ok := inf.GetIndexer().GetIndexers()[cache.NamespaceIndex]; !ok {
			if err := inf.AddIndexers(nsIndexers); err != nil {
				return fmt.Errorf("kubernetes provider: add namespace index: %w", err)
			}
		}
	}
	indexer := func(inf cache.SharedIndexInformer) cache.Indexer {
		if inf == nil {
			return nil
		}
		return inf.GetIndexer()
	}
	c := newCaches(p.opts.Node, nsInf.GetIndexer(), podInf.GetIndexer(), localInf.GetIndexer(), svcInf.GetIndexer(),
		esInf.GetIndexer(), indexer(apInf), indexer(paInf))
	p.model.c = c
	// Each handler keeps its store's indexes, then records what the event
	// may change for the next batch.
	var synced []cache.InformerSynced
	for _, inf := range infs {
		store := inf.GetIndexer()
		reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(obj any) { c.observe(store, nil, obj); p.events.add(nil, obj); p.trigger() },
			UpdateFunc: func(old, obj any) {
				c.observe(store, old, obj)
				p.events.add(old, obj)
				p.trigger()
			},
			DeleteFunc: func(obj any) {
				if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
					obj = d.Obj
				}
				c.observe(store, obj, nil)
				p.events.add(obj, nil)
				p.trigger()
			},
		})
		if err != nil {
			return fmt.Errorf("kubernetes provider: add event handler: %w", err)
		}
		// Synced once the store is and the handler has seen every object
		// of the first list (the indexes are complete).
		synced = append(synced, reg.HasSynced)
	}

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	cluster.Start(runCtx.Done())
	local.Start(runCtx.Done())
	if istioFactory != nil {
		istioFactory.Start(runCtx.Done())
	}
	defer func() {
		cancel()
		cluster.Shutdown()
		local.Shutdown()
		if istioFactory != nil {
			istioFactory.Shutdown()
		}
	}()
	if !cache.WaitForCacheSync(runCtx.Done(), synced...) {
		return ctx.Err()
	}
	p.setStatus(func(s *Status) { s.Synced, s.LastError = true, "" })
	p.log.Info("informers synced")

	retry := time.NewTimer(0)
	defer retry.Stop()
	for {
		again := p.sync(ctx)
		if again {
			retry.Reset(p.opts.RetryInterval)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.kick:
			// Let a burst of events (a rollout, a resync) settle first.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(p.opts.Debounce):
			}
		case <-retry.C:
		}
	}
}

// istioServed reports whether the API server serves security.istio.io/v1.
func (p *Provider) istioServed() bool {
	_, err := p.kube.Discovery().ServerResourcesForGroupVersion("security.istio.io/v1")
	if err != nil && !apierrors.IsNotFound(err) {
		p.log.Warn("discover security.istio.io/v1", "err", err)
	}
	return err == nil
}

func (p *Provider) trigger() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// sync brings the published model up to date with the caches: a full
// rebuild until one is published, then the changes of the events since
// the last batch. It annotates local pods and returns true if something
// should be retried.
func (p *Provider) sync(ctx context.Context) bool {
	ch := p.events.take() // before reading the caches: a later event is seen by the next batch
	if p.model.snap == nil {
		return p.rebuild(ctx)
	}
	return p.update(ctx, &ch)
}

// rebuild converts the whole caches and publishes the model.
func (p *Provider) rebuild(ctx context.Context) bool {
	c := p.model.c
	in := c.inputs()
	localPods := c.local()
	p.resolve(c, localPods)

	out := convert(in, p.conv)
	snap, err := config.NewSnapshot(out.cfg, p.opts.Config)
	if err != nil {
		// Most likely a namespace vanished between the scan and the check:
		// forget every cached path so the next rebuild rescans.
		p.netns = map[string]Netns{}
		p.fail(fmt.Errorf("build snapshot: %w", err))
		return true
	}
	gen := p.pub.Publish(snap)
	p.model.reset(&out, snap)
	p.log.Info("configuration applied", "generation", gen, "workloads", len(out.cfg.Workloads),
		"enrolled", len(out.enrolled), "waiting", len(out.waiting), "services", len(out.cfg.Services),
		"policies", len(out.cfg.Policies), "rebuild", "full")
	for _, ap := range out.cfg.Policies {
		p.warnInvalid(ap)
	}
	p.published(gen)
	return p.finish(ctx, localPods, out.enrolled, out.waiting, nil)
}

// update applies the changes ch reaches as one delta (see incremental.go).
func (p *Provider) update(ctx context.Context, ch *changes) bool {
	c := p.model.c
	localPods := c.local()
	found := p.resolve(c, localPods)
	for _, pod := range localPods {
		if found[string(pod.UID)] {
			setAdd(&ch.pods, pod.Namespace+"/"+pod.Name)
		}
	}

	st := p.model.diff(ch, localPods)
	next, rejected, redo := p.model.apply(st)
	var failed error
	if len(rejected) > 0 {
		// The rejected items keep their previous version (or absence) and are
		// retried; a local workload's network namespace is looked up again.
		for _, r := range rejected {
			if r.Kind == "workload" {
				if uid := localUID(r.Key, p.opts.ClusterID, localPods); uid != "" {
					delete(p.netns, uid)
				}
			}
		}
		p.events.again(redo)
		failed = fmt.Errorf("apply changes: %d of %d items rejected: %w", len(rejected), st.delta.Len(), joinRejections(rejected))
		p.log.Error("changes not applied; the previous version of each rejected item stays in force, retried with the next batch", "err", failed)
		p.setStatus(func(s *Status) { s.LastError = failed.Error() })
	}
	if next != p.model.snap {
		gen := p.pub.Publish(next)
		p.model.snap = next
		p.log.Debug("configuration applied", "generation", gen, "changed", st.delta.Len()-len(rejected),
			"workloads", next.NumWorkloads(), "enrolled", len(st.enrolled), "waiting", len(st.waiting),
			"services", next.NumServices(), "policies", len(next.Policies()))
		for _, ap := range st.delta.Policies {
			p.warnInvalid(ap)
		}
		p.published(gen)
	}
	return p.finish(ctx, localPods, st.enrolled, st.waiting, failed) || failed != nil
}

// warnInvalid logs the rules of ap that fail closed.
func (p *Provider) warnInvalid(ap *config.AuthorizationPolicy) {
	for _, why := range ap.Invalid {
		// Fail closed (package istioval): say what the rule now does.
		effect := "allows nobody"
		if ap.Action == config.ActionDeny {
			effect = "denies every connection in the policy's scope"
		}
		p.log.Warn("AuthorizationPolicy rule holds a value warren cannot parse; the rule "+effect+" until it is fixed",
			"policy", ap.Key(), "action", string(ap.Action), "error", why)
	}
}

// published records a publication in the status.
func (p *Provider) published(gen uint64) {
	invalid := p.model.invalidList()
	p.setStatus(func(s *Status) {
		s.Loaded, s.Generation, s.AppliedAt, s.InvalidPolicyRules = true, gen, time.Now(), invalid
	})
}

// finish annotates local pods and updates the status; failed is the error
// of this batch, if any. It returns true if an annotation should be retried
// or a pod waits for its network namespace.
func (p *Provider) finish(ctx context.Context, localPods []*corev1.Pod, enrolled map[string]*corev1.Pod, waiting []*corev1.Pod, failed error) bool {
	retry := len(waiting) > 0
	if !p.opts.NoAnnotate && !p.annotate(ctx, localPods, enrolled) {
		retry = true
	}
	skipped := p.model.skippedList()
	p.setStatus(func(s *Status) {
		w := map[string]*corev1.Pod{}
		for _, pod := range waiting {
			w[string(pod.UID)] = pod
		}
		s.Enrolled, s.Waiting, s.Skipped = podNames(enrolled), podNames(w), skipped
		if failed == nil {
			s.LastError = ""
		}
	})
	for _, pod := range waiting {
		p.log.Debug("pod waits for its network namespace", "pod", pod.Namespace+"/"+pod.Name, "uid", pod.UID)
	}
	return retry
}

// resolve refreshes the cache of network namespaces for local pods that
// belong in the mesh: drops entries whose path is gone or whose pod left,
// and scans /proc once for the missing ones.
//
// It returns the UIDs whose entry changed.
func (p *Provider) resolve(c *caches, localPods []*corev1.Pod) (changed map[string]bool) {
	before := maps.Clone(p.netns)
	defer func() {
		for uid, n := range p.netns {
			if before[uid] != n {
				setAdd(&changed, uid)
			}
		}
		for uid := range before {
			if _, ok := p.netns[uid]; !ok {
				setAdd(&changed, uid)
			}
		}
	}()
	want := map[string]bool{}
	var missing []string
	for _, pod := range localPods {
		if !InMesh(pod, c.nsLabels(pod.Namespace), p.opts.EnrollLabel, p.opts.EnrollValue) {
			continue
		}
		uid := string(pod.UID)
		want[uid] = true
		if n, ok := p.netns[uid]; ok {
			if _, err := os.Stat(n.Path); err == nil {
				continue
			}
			delete(p.netns, uid)
		}
		missing = append(missing, uid)
	}
	for uid := range p.netns {
		if !want[uid] {
			delete(p.netns, uid)
		}
	}
	if len(missing) == 0 {
		return changed
	}
	sort.Strings(missing)
	found, err := p.opts.Resolver.Resolve(missing)
	if err != nil {
		p.log.Warn("find pods' network namespaces", "err", err)
		return changed
	}
	for uid, n := range found {
		p.netns[uid] = n
		p.log.Debug("pod network namespace found", "uid", uid, "netns", n.Path, "cgroup", n.CgroupPath)
	}
	return changed
}

// annotate makes the redirection annotation of local pods match enrollment.
// It returns false if a patch failed (retried later).
func (p *Provider) annotate(ctx context.Context, localPods []*corev1.Pod, enrolled map[string]*corev1.Pod) bool {
	ok := true
	for _, pod := range localPods {
		_, want := enrolled[string(pod.UID)]
		has := pod.Annotations[RedirectionAnnotation] == RedirectionEnabled
		if want == has || pod.DeletionTimestamp != nil {
			continue
		}
		err := patchRedirection(ctx, p.kube, pod, want)
		switch {
		case apierrors.IsNotFound(err) || apierrors.IsConflict(err):
		case err != nil:
			ok = false
			p.log.Warn("annotate pod", "pod", pod.Namespace+"/"+pod.Name, "enabled", want, "err", err)
		default:
			p.log.Debug("pod annotation set", "pod", pod.Namespace+"/"+pod.Name, "annotation", RedirectionAnnotation, "enabled", want)
		}
	}
	return ok
}

func (p *Provider) fail(err error) {
	p.log.Error("configuration not published; the previous one stays in force", "err", err)
	p.setStatus(func(s *Status) { s.LastError = err.Error() })
}

func (p *Provider) setStatus(f func(*Status)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(&p.status)
}

// LastError returns why the newest state of the cluster is not in force, or nil.
func (p *Provider) LastError() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.status.LastError == "" {
		return nil
	}
	return errors.New(p.status.LastError)
}

// Status returns the provider's state.
func (p *Provider) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.status
	s.Enrolled = append([]string(nil), s.Enrolled...)
	s.Waiting = append([]string(nil), s.Waiting...)
	s.Skipped = append([]string(nil), s.Skipped...)
	return s
}

func podNames[M ~map[string]*corev1.Pod](pods M) []string {
	var out []string
	for _, pod := range pods {
		out = append(out, pod.Namespace+"/"+pod.Name)
	}
	sort.Strings(out)
	return out
}

// slimPod keeps the fields the model reads from a remote pod, so the
// cluster-wide cache costs a few hundred bytes per pod.
func slimPod(pod *corev1.Pod) *corev1.Pod {
	out := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
			CreationTimestamp: pod.CreationTimestamp,
			Labels:            pod.Labels, OwnerReferences: pod.OwnerReferences, DeletionTimestamp: pod.DeletionTimestamp,
		},
		Spec:   corev1.PodSpec{NodeName: pod.Spec.NodeName, ServiceAccountName: pod.Spec.ServiceAccountName, HostNetwork: pod.Spec.HostNetwork},
		Status: corev1.PodStatus{Phase: pod.Status.Phase, PodIP: pod.Status.PodIP, PodIPs: pod.Status.PodIPs},
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			out.Status.Conditions = []corev1.PodCondition{{Type: c.Type, Status: c.Status}}
		}
	}
	return out
}
