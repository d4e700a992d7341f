package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"sort"
	"sync"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
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
	// Debounce gathers bursts of events into one rebuild; 0 means 100 ms.
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

	// Owned by the Run goroutine.
	netns   map[string]Netns // pod UID → namespace, verified each rebuild
	lastCfg *config.Config

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
		log:   log.With("provider", "kubernetes", "node", opts.Node),
		kick:  make(chan struct{}, 1),
		netns: map[string]Netns{},
	}
	p.conv = convertOptions{
		node: opts.Node, trustDomain: opts.TrustDomain, clusterID: opts.ClusterID, domain: opts.Domain,
		rootNamespace: opts.RootNamespace, label: opts.EnrollLabel, value: opts.EnrollValue,
		netns: func(pod *corev1.Pod) (Netns, bool) { n, ok := p.netns[string(pod.UID)]; return n, ok },
	}
	p.status.Node = opts.Node
	p.status.LastError = "waiting for the API server: informers not synced yet (is it reachable, and does the RBAC allow list/watch?)"
	return p, nil
}

// listers are the informer caches a rebuild reads.
type listers struct {
	namespaces func() ([]*corev1.Namespace, error)
	localPods  func() ([]*corev1.Pod, error)
	allPods    func() ([]*corev1.Pod, error)
	services   func() ([]*corev1.Service, error)
	slices     func() ([]*discoveryv1.EndpointSlice, error)
	inputs     func(*Inputs) error // Istio policies, if served
}

// Run starts the informers, publishes the first model once they have synced,
// and a new one after every change until ctx ends; it returns ctx.Err(), or
// an error if the informers cannot start.
func (p *Provider) Run(ctx context.Context) error {
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { p.trigger() },
		UpdateFunc: func(any, any) { p.trigger() },
		DeleteFunc: func(any) { p.trigger() },
	}
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
	nsInf := cluster.Core().V1().Namespaces()
	podInf := cluster.Core().V1().Pods()
	svcInf := cluster.Core().V1().Services()
	esInf := cluster.Discovery().V1().EndpointSlices()
	localInf := local.Core().V1().Pods()
	for _, inf := range []cache.SharedIndexInformer{nsInf.Informer(), podInf.Informer(), svcInf.Informer(), esInf.Informer(), localInf.Informer()} {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return fmt.Errorf("kubernetes provider: add event handler: %w", err)
		}
	}
	l := listers{
		namespaces: func() ([]*corev1.Namespace, error) { return nsInf.Lister().List(labels.Everything()) },
		localPods:  func() ([]*corev1.Pod, error) { return localInf.Lister().List(labels.Everything()) },
		allPods:    func() ([]*corev1.Pod, error) { return podInf.Lister().List(labels.Everything()) },
		services:   func() ([]*corev1.Service, error) { return svcInf.Lister().List(labels.Everything()) },
		slices:     func() ([]*discoveryv1.EndpointSlice, error) { return esInf.Lister().List(labels.Everything()) },
		inputs:     func(*Inputs) error { return nil },
	}

	var istioFactory istioinformers.SharedInformerFactory
	if p.istio != nil && p.istioServed() {
		istioFactory = istioinformers.NewSharedInformerFactory(p.istio, 0)
		apInf := istioFactory.Security().V1().AuthorizationPolicies()
		paInf := istioFactory.Security().V1().PeerAuthentications()
		for _, inf := range []cache.SharedIndexInformer{apInf.Informer(), paInf.Informer()} {
			if _, err := inf.AddEventHandler(handler); err != nil {
				return fmt.Errorf("kubernetes provider: add event handler: %w", err)
			}
		}
		l.inputs = func(in *Inputs) error {
			var err error
			if in.Policies, err = apInf.Lister().List(labels.Everything()); err != nil {
				return err
			}
			in.PeerAuthentications, err = paInf.Lister().List(labels.Everything())
			return err
		}
		p.setStatus(func(s *Status) { s.IstioPolicies = true })
	} else {
		p.log.Warn("security.istio.io/v1 is not served: AuthorizationPolicy and PeerAuthentication are not enforced (install Istio's CRDs and restart the agent)")
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
	synced := []cache.InformerSynced{nsInf.Informer().HasSynced, podInf.Informer().HasSynced, svcInf.Informer().HasSynced,
		esInf.Informer().HasSynced, localInf.Informer().HasSynced}
	if istioFactory != nil {
		for _, ok := range istioFactory.WaitForCacheSync(runCtx.Done()) {
			if !ok {
				return ctx.Err()
			}
		}
	}
	if !cache.WaitForCacheSync(runCtx.Done(), synced...) {
		return ctx.Err()
	}
	p.setStatus(func(s *Status) { s.Synced, s.LastError = true, "" })
	p.log.Info("informers synced")

	retry := time.NewTimer(0)
	defer retry.Stop()
	for {
		again := p.rebuild(ctx, l)
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

// rebuild converts the caches, publishes the model if it changed, and
// annotates local pods. It returns true if something should be retried.
func (p *Provider) rebuild(ctx context.Context, l listers) bool {
	var in Inputs
	var errs []error
	var err error
	in.Namespaces, err = l.namespaces()
	errs = append(errs, err)
	localPods, err := l.localPods()
	errs = append(errs, err)
	allPods, err := l.allPods()
	errs = append(errs, err)
	in.Services, err = l.services()
	errs = append(errs, err)
	in.EndpointSlices, err = l.slices()
	errs = append(errs, err)
	errs = append(errs, l.inputs(&in))
	if err := errors.Join(errs...); err != nil {
		p.fail(fmt.Errorf("list from informer caches: %w", err))
		return true
	}
	// Local pods come from the field-selected informer (full objects), the
	// others from the cluster-wide one.
	in.Pods = append(in.Pods, localPods...)
	for _, pod := range allPods {
		if pod.Spec.NodeName != p.opts.Node {
			in.Pods = append(in.Pods, pod)
		}
	}
	p.resolve(in.Namespaces, localPods)

	out := convert(in, p.conv)
	retry := len(out.waiting) > 0
	if !reflect.DeepEqual(p.lastCfg, &out.cfg) {
		snap, err := config.NewSnapshot(out.cfg, p.opts.Config)
		if err != nil {
			// Most likely a namespace vanished between the scan and the check:
			// forget every cached path so the next rebuild rescans.
			p.netns = map[string]Netns{}
			p.fail(fmt.Errorf("build snapshot: %w", err))
			return true
		}
		gen := p.pub.Publish(snap)
		cfg := out.cfg
		p.lastCfg = &cfg
		p.log.Info("configuration applied", "generation", gen, "workloads", len(out.cfg.Workloads),
			"enrolled", len(out.enrolled), "waiting", len(out.waiting), "services", len(out.cfg.Services),
			"policies", len(out.cfg.Policies))
		var invalid []string
		for _, ap := range out.cfg.Policies {
			for _, why := range ap.Invalid {
				// Fail closed (package istioval): say what the rule now does.
				effect := "allows nobody"
				if ap.Action == config.ActionDeny {
					effect = "denies every connection in the policy's scope"
				}
				p.log.Warn("AuthorizationPolicy rule holds a value warren cannot parse; the rule "+effect+" until it is fixed",
					"policy", ap.Key(), "action", string(ap.Action), "error", why)
				invalid = append(invalid, ap.Key()+": "+why)
			}
		}
		p.setStatus(func(s *Status) {
			s.Loaded, s.Generation, s.AppliedAt, s.InvalidPolicyRules = true, gen, time.Now(), invalid
		})
	}
	if !p.opts.NoAnnotate && !p.annotate(ctx, localPods, out.enrolled) {
		retry = true
	}
	p.setStatus(func(s *Status) {
		waiting := map[string]*corev1.Pod{}
		for _, pod := range out.waiting {
			waiting[string(pod.UID)] = pod
		}
		s.Enrolled, s.Waiting, s.Skipped, s.LastError = podNames(out.enrolled), podNames(waiting), out.skipped, ""
	})
	for _, pod := range out.waiting {
		p.log.Debug("pod waits for its network namespace", "pod", pod.Namespace+"/"+pod.Name, "uid", pod.UID)
	}
	return retry
}

// resolve refreshes the cache of network namespaces for local pods that
// belong in the mesh: drops entries whose path is gone or whose pod left,
// and scans /proc once for the missing ones.
func (p *Provider) resolve(namespaces []*corev1.Namespace, localPods []*corev1.Pod) {
	nsLabels := map[string]map[string]string{}
	for _, ns := range namespaces {
		nsLabels[ns.Name] = ns.Labels
	}
	want := map[string]bool{}
	var missing []string
	for _, pod := range localPods {
		if !InMesh(pod, nsLabels[pod.Namespace], p.opts.EnrollLabel, p.opts.EnrollValue) {
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
		return
	}
	sort.Strings(missing)
	found, err := p.opts.Resolver.Resolve(missing)
	if err != nil {
		p.log.Warn("find pods' network namespaces", "err", err)
		return
	}
	for uid, n := range found {
		p.netns[uid] = n
		p.log.Debug("pod network namespace found", "uid", uid, "netns", n.Path, "cgroup", n.CgroupPath)
	}
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
