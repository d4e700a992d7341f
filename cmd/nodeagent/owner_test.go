//go:build !nokube

package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

const (
	ownerNS  = "warren-system"
	ownerPod = "warren-abcde"
	ownerDS  = "warren"
	ownerUID = types.UID("ds-uid-1")
)

func ownerFixtures(withOwner bool) (*appsv1.DaemonSet, *corev1.Pod) {
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: ownerDS, Namespace: ownerNS, UID: ownerUID}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: ownerPod, Namespace: ownerNS}}
	if withOwner {
		pod.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ownerDS, UID: ownerUID, Controller: ptrTo(true)}}
	}
	return ds, pod
}

func ptrTo[T any](v T) *T { return &v }

// startOwnerWatch runs the watch on a fake clientset holding the DaemonSet
// and the agent's pod, and waits until it has listed the DaemonSet.
func startOwnerWatch(t *testing.T, objs ...runtime.Object) (*ownerWatch, *fake.Clientset) {
	t.Helper()
	cs := fake.NewClientset(objs...)
	w := newOwnerWatch(cs, ownerNS, ownerPod, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-w.seen:
	case <-time.After(30 * time.Second):
		t.Fatal("the watch never listed the DaemonSet")
	}
	return w, cs
}

func waitGone(t *testing.T, w *ownerWatch) {
	t.Helper()
	select {
	case <-w.changed:
	case <-time.After(30 * time.Second):
		t.Fatal("the watch never saw the DaemonSet go")
	}
}

func TestOwnerWatchRestartKeepsPins(t *testing.T) {
	// kubectl delete pod, helm upgrade, a node drain: the DaemonSet stays.
	ds, pod := ownerFixtures(true)
	w, cs := startOwnerWatch(t, ds, pod)
	// An update of the DaemonSet (helm upgrade) is no uninstall.
	ds2 := ds.DeepCopy()
	ds2.Spec.Template.Labels = map[string]string{"rev": "2"}
	if _, err := cs.AppsV1().DaemonSets(ownerNS).Update(context.Background(), ds2, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	un, why := w.uninstalled(context.Background())
	if un {
		t.Fatalf("uninstall while the DaemonSet exists: %s", why)
	}
	if !strings.Contains(why, "still exists") {
		t.Errorf("why = %q", why)
	}
}

func TestOwnerWatchDeletedUninstalls(t *testing.T) {
	ds, pod := ownerFixtures(true)
	w, cs := startOwnerWatch(t, ds, pod)
	if err := cs.AppsV1().DaemonSets(ownerNS).Delete(context.Background(), ownerDS, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitGone(t, w)
	// helm uninstall deletes the agent's RBAC and ServiceAccount too: by
	// SIGTERM the API refuses it. The delete the watch saw decides.
	cs.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, ownerDS, errors.New("no RBAC"))
	})
	if un, why := w.uninstalled(context.Background()); !un || !strings.Contains(why, "was deleted") {
		t.Errorf("uninstalled = %v, %q; want true, deleted", un, why)
	}
}

func TestOwnerWatchBeingDeletedUninstalls(t *testing.T) {
	// Foreground deletion: the DaemonSet stays, with a deletionTimestamp, until its pods are gone.
	ds, pod := ownerFixtures(true)
	w, cs := startOwnerWatch(t, ds, pod)
	ds2 := ds.DeepCopy()
	ds2.DeletionTimestamp = &metav1.Time{Time: time.Now()}
	ds2.Finalizers = []string{metav1.FinalizerDeleteDependents}
	if _, err := cs.AppsV1().DaemonSets(ownerNS).Update(context.Background(), ds2, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitGone(t, w)
	if un, why := w.uninstalled(context.Background()); !un || !strings.Contains(why, "being deleted") {
		t.Errorf("uninstalled = %v, %q", un, why)
	}
}

func TestOwnerWatchReplacedUninstalls(t *testing.T) {
	// Deleted and created again (another UID) while the watch was away: the GET tells.
	ds, pod := ownerFixtures(true)
	w, cs := startOwnerWatch(t, ds, pod)
	cs.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
		n := ds.DeepCopy()
		n.UID = "ds-uid-2"
		return true, n, nil
	})
	if un, why := w.uninstalled(context.Background()); !un || !strings.Contains(why, "replaced") {
		t.Errorf("uninstalled = %v, %q", un, why)
	}
}

func TestOwnerWatchNotFoundUninstalls(t *testing.T) {
	// The delete happened while the watch was away; the API still answers.
	ds, pod := ownerFixtures(true)
	w, cs := startOwnerWatch(t, ds, pod)
	cs.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewNotFound(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, ownerDS)
	})
	if un, why := w.uninstalled(context.Background()); !un || !strings.Contains(why, "not found") {
		t.Errorf("uninstalled = %v, %q", un, why)
	}
}

func TestOwnerWatchCannotTellKeepsPins(t *testing.T) {
	// No delete seen and the API refuses or cannot be reached: keep the pins.
	for name, err := range map[string]error{
		"forbidden":   apierrors.NewForbidden(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, ownerDS, errors.New("no RBAC")),
		"unreachable": errors.New("dial tcp 198.18.81.1:6443: connect: connection refused"),
		"timeout":     apierrors.NewServerTimeout(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, "get", 1),
	} {
		t.Run(name, func(t *testing.T) {
			ds, pod := ownerFixtures(true)
			w, cs := startOwnerWatch(t, ds, pod)
			cs.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) { return true, nil, err })
			if un, why := w.uninstalled(context.Background()); un || !strings.Contains(why, "keeping the pins") {
				t.Errorf("uninstalled = %v, %q; want false, keeping the pins", un, why)
			}
		})
	}
}

func TestOwnerWatchNoOwnerKeepsPins(t *testing.T) {
	// A pod not run by a DaemonSet (or the owner not found yet): never uninstall.
	ds, pod := ownerFixtures(false)
	cs := fake.NewClientset(ds, pod)
	w := newOwnerWatch(cs, ownerNS, ownerPod, slog.New(slog.NewTextHandler(io.Discard, nil)))
	w.run(context.Background()) // returns: no owner
	if err := cs.AppsV1().DaemonSets(ownerNS).Delete(context.Background(), ownerDS, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if un, why := w.uninstalled(context.Background()); un || !strings.Contains(why, "unknown") {
		t.Errorf("uninstalled = %v, %q", un, why)
	}
	// The pod cannot be read at all (API down at start): unknown too.
	w = newOwnerWatch(fake.NewClientset(), ownerNS, ownerPod, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err := w.resolve(context.Background()); err == nil {
		t.Fatal("resolve without the pod succeeded")
	}
	if un, _ := w.uninstalled(context.Background()); un {
		t.Error("uninstall with the owner unknown")
	}
}
