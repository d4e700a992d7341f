package kube_test

import (
	"context"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/warren-mesh/warren/pkg/config/kube"
)

// annotPod is a running pod with an IP.
func annotPod(ns, name, nodeName string, mod func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + ns + "-" + name)},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "198.18.0.10"},
	}
	if mod != nil {
		mod(p)
	}
	return p
}

// TestAnnotatorSync: the istiod mode's annotator writes
// ambient.istio.io/redirection=enabled on this node's mesh pods only once
// their network namespace is found, removes it when a pod opts out, and
// leaves other nodes' pods, hostNetwork pods, opted-out pods and pods of
// unlabelled namespaces alone.
func TestAnnotatorSync(t *testing.T) {
	ctx := context.Background()
	nss := []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "mesh", Labels: map[string]string{kube.DefaultEnrollLabel: kube.DefaultEnrollValue}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "plain"}},
	}
	app := annotPod("mesh", "app", node, nil)
	pods := []*corev1.Pod{
		app,
		annotPod("mesh", "remote", "node-b", nil),
		annotPod("mesh", "hostnet", node, func(p *corev1.Pod) { p.Spec.HostNetwork = true }),
		annotPod("mesh", "optout", node, func(p *corev1.Pod) {
			p.Labels = map[string]string{kube.DefaultEnrollLabel: kube.OptOutValue}
		}),
		annotPod("mesh", "noip", node, func(p *corev1.Pod) { p.Status.PodIP = "" }),
		annotPod("mesh", "done", node, func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }),
		annotPod("plain", "app", node, nil),
	}
	var objs []runtime.Object
	for _, p := range pods {
		objs = append(objs, p)
	}
	kc := fake.NewClientset(objs...)
	res := &resolver{known: map[string]bool{}}
	a, err := kube.NewAnnotator(kc, kube.AnnotatorOptions{Node: node, Resolver: res})
	if err != nil {
		t.Fatal(err)
	}
	current := func() []*corev1.Pod {
		t.Helper()
		var out []*corev1.Pod
		for _, p := range pods {
			got, err := kc.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, got)
		}
		return out
	}
	annotated := func() map[string]bool {
		t.Helper()
		out := map[string]bool{}
		for _, p := range current() {
			if v, ok := p.Annotations[kube.RedirectionAnnotation]; ok {
				if v != kube.RedirectionEnabled {
					t.Fatalf("%s/%s: annotation %q", p.Namespace, p.Name, v)
				}
				out[p.Namespace+"/"+p.Name] = true
			}
		}
		return out
	}

	// Every pod's namespace is known except app's: nothing is annotated, and
	// the annotator asks to be retried.
	for _, p := range pods {
		if p != app {
			res.set(p.UID)
		}
	}
	if !a.Sync(ctx, current(), nss) {
		t.Error("Sync with a pod waiting for its network namespace: want retry")
	}
	if got := annotated(); len(got) != 0 {
		t.Fatalf("annotated before the network namespace was found: %v", got)
	}

	// Found: app, and only app, is annotated.
	res.set(app.UID)
	if a.Sync(ctx, current(), nss) {
		t.Error("Sync with every pod settled: want no retry")
	}
	if got := annotated(); len(got) != 1 || !got["mesh/app"] {
		t.Fatalf("annotated = %v, want only mesh/app", got)
	}

	// Opting the pod out removes the annotation.
	out := current()
	out[0].Labels = map[string]string{kube.DefaultEnrollLabel: kube.OptOutValue}
	if _, err := kc.CoreV1().Pods("mesh").Update(ctx, out[0], metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.Sync(ctx, current(), nss)
	if got := annotated(); len(got) != 0 {
		t.Fatalf("after the opt-out label: annotated = %v, want none", got)
	}

	// Back in, then the namespace loses its label: removed again.
	out = current()
	out[0].Labels = nil
	if _, err := kc.CoreV1().Pods("mesh").Update(ctx, out[0], metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.Sync(ctx, current(), nss)
	if got := annotated(); !got["mesh/app"] {
		t.Fatalf("after removing the opt-out label: annotated = %v, want mesh/app", got)
	}
	nss[0].Labels = nil
	a.Sync(ctx, current(), nss)
	if got := annotated(); len(got) != 0 {
		t.Fatalf("after the namespace label was removed: annotated = %v, want none", got)
	}
}
