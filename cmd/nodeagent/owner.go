//go:build !nokube

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// ownerWatch tells an agent that got SIGTERM, with no successor, whether it
// was uninstalled: its pod's DaemonSet is deleted (helm uninstall, kubectl
// delete daemonset), as opposed to restarted (helm upgrade, kubectl delete
// pod, a node drain), where the DaemonSet stays and the pins must stay for
// the next agent.
//
// It learns the DaemonSet from its own pod's controller owner reference and
// watches it while the agent runs, because helm uninstall deletes the
// agents' ServiceAccount and RBAC in the same breath as the DaemonSet: by the
// time the kubelet stops the pod (after --handover-timeout) the agent can
// no longer ask, but its watch, opened while it could, saw the delete.
// Anything it cannot tell — owner unknown, API unreachable, a refused GET
// with no delete seen — answers "keep": the restart guarantee wins over a
// clean node, and nodeagent uninstall cleans up by hand.
type ownerWatch struct {
	client         kubernetes.Interface
	namespace, pod string
	log            *slog.Logger

	mu   sync.Mutex
	name string    // the owning DaemonSet, "" until known
	uid  types.UID // its UID when the agent started
	gone string    // why it is known to be deleted, "" while not
	// seen is closed once the watch has listed the DaemonSet (tests wait on it).
	seen chan struct{}
	// changed is signalled (never blocking) when gone is set (tests wait on it).
	changed chan struct{}
}

func newOwnerWatch(client kubernetes.Interface, namespace, pod string, log *slog.Logger) *ownerWatch {
	return &ownerWatch{client: client, namespace: namespace, pod: pod, log: log,
		seen: make(chan struct{}), changed: make(chan struct{}, 1)}
}

// newOwnerWatchFromFlags builds the watch from --pod-name and --pod-namespace
// (the chart sets them from the downward API); nil when they are unset or no
// Kubernetes API is configured (an agent outside a pod: --provider=istiod
// tests), which keeps the pins on every SIGTERM.
func newOwnerWatchFromFlags(o *runOptions, log *slog.Logger) (*ownerWatch, error) {
	name, ns := o.istiod.podName, o.istiod.podNamespace
	if name == "" || ns == "" {
		return nil, nil
	}
	cfg, err := o.kube.restConfig()
	if err != nil {
		log.Info("no Kubernetes API to watch this pod's DaemonSet: SIGTERM always keeps the pins", "pod", ns+"/"+name, "err", err)
		return nil, nil
	}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client for --pod-name: %w", err)
	}
	return newOwnerWatch(kc, ns, name, log), nil
}

// run finds the owning DaemonSet (retrying while the API server cannot be
// reached) and watches it until ctx ends.
func (w *ownerWatch) run(ctx context.Context) {
	backoff := time.Second
	for {
		err := w.resolve(ctx)
		if err == nil {
			break
		}
		if errors.Is(err, errNoDaemonSet) {
			w.log.Info("this pod has no DaemonSet owner: SIGTERM never uninstalls", "pod", w.namespace+"/"+w.pod)
			return
		}
		w.log.Warn("find this pod's DaemonSet (until found, SIGTERM keeps the pins)", "pod", w.namespace+"/"+w.pod, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
	w.mu.Lock()
	name, uid := w.name, w.uid
	w.mu.Unlock()
	f := informers.NewSharedInformerFactoryWithOptions(w.client, 0, informers.WithNamespace(w.namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	inf := f.Apps().V1().DaemonSets().Informer()
	check := func(obj any) {
		ds, ok := obj.(*appsv1.DaemonSet)
		if !ok || ds.Name != name {
			return
		}
		switch {
		case ds.UID != uid:
			w.markGone(fmt.Sprintf("DaemonSet %s/%s was deleted and replaced (uid %s, was %s)", w.namespace, name, ds.UID, uid))
		case ds.DeletionTimestamp != nil:
			w.markGone(fmt.Sprintf("DaemonSet %s/%s is being deleted", w.namespace, name))
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    check,
		UpdateFunc: func(_, obj any) { check(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.Name == name && ds.UID == uid {
				w.markGone(fmt.Sprintf("DaemonSet %s/%s was deleted", w.namespace, name))
			}
		},
	}); err != nil {
		w.log.Warn("watch this agent's DaemonSet (SIGTERM keeps the pins)", "err", err)
		return
	}
	f.Start(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		close(w.seen)
		w.log.Info("watching this agent's DaemonSet: SIGTERM after it is deleted uninstalls capture from the node", "daemonset", w.namespace+"/"+name, "uid", uid)
	}
	<-ctx.Done()
	f.Shutdown()
}

var errNoDaemonSet = errors.New("no DaemonSet controls this pod")

// resolve reads the agent's pod and records its controlling DaemonSet.
func (w *ownerWatch) resolve(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	p, err := w.client.CoreV1().Pods(w.namespace).Get(ctx, w.pod, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get pod %s/%s: %w", w.namespace, w.pod, err)
	}
	ref := metav1.GetControllerOf(p)
	if ref == nil || ref.Kind != "DaemonSet" || ref.APIVersion != appsv1.SchemeGroupVersion.String() {
		return errNoDaemonSet
	}
	w.mu.Lock()
	w.name, w.uid = ref.Name, ref.UID
	w.mu.Unlock()
	return nil
}

func (w *ownerWatch) markGone(why string) {
	w.mu.Lock()
	first := w.gone == ""
	if first {
		w.gone = why
	}
	w.mu.Unlock()
	if first {
		w.log.Info("this agent's DaemonSet is gone: the next SIGTERM without a successor uninstalls capture", "why", why)
		select {
		case w.changed <- struct{}{}:
		default:
		}
	}
}

// uninstalled answers, on SIGTERM with no successor, whether the agent was
// uninstalled (true) or is restarting (false), and why. It fails towards
// false.
func (w *ownerWatch) uninstalled(ctx context.Context) (bool, string) {
	w.mu.Lock()
	name, uid, gone := w.name, w.uid, w.gone
	w.mu.Unlock()
	if gone != "" {
		return true, gone
	}
	if name == "" {
		return false, "this pod's DaemonSet is unknown: keeping the pins"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ds, err := w.client.AppsV1().DaemonSets(w.namespace).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return true, fmt.Sprintf("DaemonSet %s/%s not found", w.namespace, name)
	case err != nil:
		return false, fmt.Sprintf("cannot tell whether DaemonSet %s/%s still exists (%v): keeping the pins", w.namespace, name, err)
	case ds.UID != uid:
		return true, fmt.Sprintf("DaemonSet %s/%s was replaced (uid %s, was %s)", w.namespace, name, ds.UID, uid)
	case ds.DeletionTimestamp != nil:
		return true, fmt.Sprintf("DaemonSet %s/%s is being deleted", w.namespace, name)
	}
	return false, fmt.Sprintf("DaemonSet %s/%s still exists (a restart): keeping the pins for the next agent", w.namespace, name)
}
