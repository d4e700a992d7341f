//go:build !nokube

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/xds"
)

// newLocalPods finds this node's pods' network namespaces for the istiod
// provider: one informer on this node's Pods only (field selector
// spec.nodeName, kept to name, namespace and UID) gives each pod's UID,
// and the Kubernetes provider's /proc resolver maps the UID to the netns.
// See package xds for why. With --annotate-pods it also runs
// kube.Annotator, which writes ambient.istio.io/redirection=enabled on this
// node's mesh pods once their network namespace is found (istiod marks a
// workload HBONE only with it).
func newLocalPods(o *runOptions, log *slog.Logger) (xds.LocalPods, func(context.Context) error, error) {
	cfg, err := o.kube.restConfig()
	if err != nil {
		return nil, nil, err
	}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("kubernetes client: %w", err)
	}
	factory := informers.NewSharedInformerFactoryWithOptions(kc, 0,
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
			lo.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", o.node).String()
		}),
		informers.WithTransform(func(obj any) (any, error) {
			if pod, ok := obj.(*corev1.Pod); ok {
				return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID}}, nil
			}
			return obj, nil
		}))
	inf := factory.Core().V1().Pods().Informer()
	res := kube.ProcResolver{ProcRoot: o.kube.procRoot, NetnsDirs: o.kube.netnsDirs}
	np := &nodePods{store: inf.GetStore(), res: res}
	var ann *kube.Annotator
	if o.kube.annotate {
		if ann, err = kube.NewAnnotator(kc, kube.AnnotatorOptions{Node: o.node, Resolver: res, Logger: log}); err != nil {
			return nil, nil, err
		}
	}
	start := func(ctx context.Context) error {
		factory.Start(ctx.Done())
		if ann != nil {
			go func() {
				if err := ann.Run(ctx); err != nil && ctx.Err() == nil {
					log.Error("pod annotator stopped; new pods are not annotated for istiod", "err", err)
				}
			}()
		}
		go func() {
			if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
				return
			}
			log.Info("this node's pods listed", "node", o.node, "pods", len(inf.GetStore().ListKeys()))
		}()
		return nil
	}
	return np, start, nil
}

// nodePods maps pods of this node to their UIDs, then to network namespaces.
type nodePods struct {
	store cache.Store
	res   kube.ProcResolver
}

func (n *nodePods) Resolve(refs []xds.PodRef) (map[xds.PodRef]xds.Netns, error) {
	byUID := map[string]xds.PodRef{}
	var uids []string
	var errs []error
	for _, r := range refs {
		obj, ok, err := n.store.GetByKey(r.Namespace + "/" + r.Name)
		if err != nil || !ok {
			errs = append(errs, fmt.Errorf("pod %s/%s: not (yet) listed on this node", r.Namespace, r.Name))
			continue
		}
		uid := string(obj.(*corev1.Pod).UID)
		byUID[uid] = r
		uids = append(uids, uid)
	}
	out := map[xds.PodRef]xds.Netns{}
	if len(uids) == 0 {
		return out, errors.Join(errs...)
	}
	found, err := n.res.Resolve(uids)
	if err != nil {
		errs = append(errs, err)
	}
	for uid, ns := range found {
		out[byUID[uid]] = xds.Netns{Path: ns.Path, CgroupPath: ns.CgroupPath}
	}
	return out, errors.Join(errs...)
}
