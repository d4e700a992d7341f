package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sort"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// patchRedirection sets (want) or removes the redirection annotation of
// pod, only if the pod still has the UID we saw.
func patchRedirection(ctx context.Context, kc kubernetes.Interface, pod *corev1.Pod, want bool) error {
	var value any // JSON null removes the annotation
	if want {
		value = RedirectionEnabled
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"annotations": map[string]any{RedirectionAnnotation: value},
		// Only if it is still the pod we saw.
		"uid": pod.UID,
	}})
	if err != nil {
		return fmt.Errorf("encode patch: %w", err)
	}
	if _, err := kc.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("patch pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return nil
}

// AnnotatorOptions configure an Annotator. Only Node is required.
type AnnotatorOptions struct {
	// Node is this node's name (spec.nodeName of its pods).
	Node string
	// EnrollLabel and EnrollValue select enrolled namespaces; "" means
	// DefaultEnrollLabel and DefaultEnrollValue. A pod with EnrollLabel=none opts out.
	EnrollLabel, EnrollValue string
	// Resolver finds network namespaces; nil means ProcResolver{} (host /proc).
	Resolver Resolver
	// RetryInterval re-resolves pods still waiting for their namespace and
	// retries failed patches; 0 means 1 s.
	RetryInterval time.Duration
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Annotator writes the redirection annotation on this node's pods for a
// control plane that reads it (istiod marks a pod's workload HBONE only
// when it carries ambient.istio.io/redirection=enabled). A pod is annotated
// when it belongs in the mesh by the Kubernetes provider's rules (InMesh,
// and a running pod with an IP) and only once its network namespace is
// found, so the control plane turns it HBONE only when it can be captured;
// the annotation is removed when the pod stops qualifying. It watches this
// node's pods (field selector spec.nodeName) and namespaces only.
type Annotator struct {
	kube kubernetes.Interface
	opts AnnotatorOptions
	log  *slog.Logger
}

// NewAnnotator returns an annotator; call Run.
func NewAnnotator(kc kubernetes.Interface, opts AnnotatorOptions) (*Annotator, error) {
	if opts.Node == "" {
		return nil, fmt.Errorf("pod annotator: node name is required")
	}
	if opts.EnrollLabel == "" {
		opts.EnrollLabel = DefaultEnrollLabel
	}
	if opts.EnrollValue == "" {
		opts.EnrollValue = DefaultEnrollValue
	}
	if opts.Resolver == nil {
		opts.Resolver = ProcResolver{}
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Annotator{kube: kc, opts: opts, log: log.With("component", "pod-annotator")}, nil
}

// Run watches this node's pods and the namespaces and keeps the
// annotations in line until ctx ends.
func (a *Annotator) Run(ctx context.Context) error {
	local := informers.NewSharedInformerFactoryWithOptions(a.kube, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.opts.Node).String()
		}),
		informers.WithTransform(func(obj any) (any, error) {
			if pod, ok := obj.(*corev1.Pod); ok {
				slim := slimPod(pod)
				if v, ok := pod.Annotations[RedirectionAnnotation]; ok {
					slim.Annotations = map[string]string{RedirectionAnnotation: v}
				}
				return slim, nil
			}
			return obj, nil
		}))
	cluster := informers.NewSharedInformerFactoryWithOptions(a.kube, 0,
		informers.WithTransform(func(obj any) (any, error) {
			if ns, ok := obj.(*corev1.Namespace); ok {
				return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns.Name, UID: ns.UID, Labels: ns.Labels}}, nil
			}
			return obj, nil
		}))
	podInf := local.Core().V1().Pods()
	nsInf := cluster.Core().V1().Namespaces()
	kick := make(chan struct{}, 1)
	trigger := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { trigger() },
		UpdateFunc: func(any, any) { trigger() },
		DeleteFunc: func(any) { trigger() },
	}
	for _, inf := range []cache.SharedIndexInformer{podInf.Informer(), nsInf.Informer()} {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return fmt.Errorf("pod annotator: add event handler: %w", err)
		}
	}
	local.Start(ctx.Done())
	cluster.Start(ctx.Done())
	defer local.Shutdown()
	defer cluster.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), podInf.Informer().HasSynced, nsInf.Informer().HasSynced) {
		return ctx.Err()
	}
	a.log.Info("annotating this node's pods for istiod", "node", a.opts.Node)
	retry := time.NewTimer(0)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
		case <-retry.C:
		}
		pods, err := podInf.Lister().List(labels.Everything())
		if err == nil {
			var nss []*corev1.Namespace
			if nss, err = nsInf.Lister().List(labels.Everything()); err == nil && a.Sync(ctx, pods, nss) {
				retry.Reset(a.opts.RetryInterval)
			}
		}
		if err != nil {
			a.log.Warn("list from informer caches", "err", err)
			retry.Reset(a.opts.RetryInterval)
		}
	}
}

// Sync makes the annotation of pods of this node match the rules, given
// the namespaces. It returns true if something should be retried: a pod
// whose network namespace is not found yet, or a failed patch.
func (a *Annotator) Sync(ctx context.Context, pods []*corev1.Pod, namespaces []*corev1.Namespace) (retry bool) {
	nsLabels := map[string]map[string]string{}
	for _, ns := range namespaces {
		nsLabels[ns.Name] = ns.Labels
	}
	var add []*corev1.Pod
	var uids []string
	for _, pod := range pods {
		if pod.Spec.NodeName != a.opts.Node || pod.DeletionTimestamp != nil {
			continue
		}
		w, _ := podWorkload1(pod, convertOptions{})
		want := w != nil && InMesh(pod, nsLabels[pod.Namespace], a.opts.EnrollLabel, a.opts.EnrollValue)
		has := pod.Annotations[RedirectionAnnotation] == RedirectionEnabled
		switch {
		case want && !has:
			add = append(add, pod)
			uids = append(uids, string(pod.UID))
		case !want && has:
			if !a.patch(ctx, pod, false) {
				retry = true
			}
		}
	}
	if len(add) == 0 {
		return retry
	}
	sort.Strings(uids)
	found, err := a.opts.Resolver.Resolve(uids)
	if err != nil {
		a.log.Warn("find pods' network namespaces", "err", err)
		return true
	}
	for _, pod := range add {
		if _, ok := found[string(pod.UID)]; !ok {
			// Not capturable yet: istiod must not mark it HBONE.
			a.log.Debug("pod waits for its network namespace", "pod", pod.Namespace+"/"+pod.Name, "uid", pod.UID)
			retry = true
			continue
		}
		if !a.patch(ctx, pod, true) {
			retry = true
		}
	}
	return retry
}

// patch sets or removes the annotation; false if it should be retried.
func (a *Annotator) patch(ctx context.Context, pod *corev1.Pod, want bool) bool {
	err := patchRedirection(ctx, a.kube, pod, want)
	switch {
	case apierrors.IsNotFound(err) || apierrors.IsConflict(err):
		// Gone or replaced: the informer brings the new state.
	case err != nil:
		a.log.Warn("annotate pod", "pod", pod.Namespace+"/"+pod.Name, "enabled", want, "err", err)
		return false
	default:
		a.log.Info("pod annotation set", "pod", pod.Namespace+"/"+pod.Name, "annotation", RedirectionAnnotation, "enabled", want)
	}
	return true
}
