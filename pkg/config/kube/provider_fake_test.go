package kube_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/store"
)

// TestProviderIncrementalFake runs the provider's informers, handlers and
// indexes on client-go's fake clientset (no API server: every pod is on
// this node, as the fake ignores field selectors), through a first full
// snapshot and then deltas. TestProvider covers the same against a real
// API server when its binaries are built.
func TestProviderIncrementalFake(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	kc := fake.NewClientset()
	st := store.New(node)
	res := &resolver{known: map[string]bool{}}
	prov, err := kube.New(kc, nil, st, kube.Options{Node: node, Resolver: res, NoAnnotate: true,
		Config: config.Options{CheckNetns: func(string) error { return nil }}, Debounce: time.Millisecond,
		RetryInterval: 20 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	mk := func(name, ip string) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "mesh", Name: name, UID: k8stypes.UID("uid-" + name)},
			Spec:   corev1.PodSpec{NodeName: node},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip}}
		res.set(p.UID)
		return p
	}
	if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "mesh",
		Labels: map[string]string{kube.DefaultEnrollLabel: kube.DefaultEnrollValue}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.CoreV1().Pods("mesh").Create(ctx, mk("a", "198.19.1.1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- prov.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != context.Canceled {
			t.Errorf("Run returned %v", err)
		}
	}()
	wait := func(what string, check func(s *config.Snapshot) error) {
		t.Helper()
		var err error
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if err = check(st.Current()); err == nil {
				return
			}
		}
		t.Fatalf("%s: %v (status %+v)", what, err, prov.Status())
	}
	wantEnrolled := func(want ...string) func(s *config.Snapshot) error {
		return func(s *config.Snapshot) error {
			var got []string
			for _, w := range s.EnrolledWorkloads() {
				got = append(got, w.Name)
			}
			if !slices.Equal(got, want) {
				return fmt.Errorf("enrolled %v, want %v", got, want)
			}
			return nil
		}
	}
	wait("first snapshot", wantEnrolled("a"))
	gen := st.Generation()

	// Deltas from here on: a pod added, a service and its slice, an opt-out.
	if _, err := kc.CoreV1().Pods("mesh").Create(ctx, mk("b", "198.19.1.2"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("pod added", wantEnrolled("a", "b"))
	if _, err := kc.CoreV1().Services("mesh").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "mesh", Name: "echo"},
		Spec: corev1.ServiceSpec{ClusterIP: "198.18.200.1", Ports: []corev1.ServicePort{{Port: 80}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.DiscoveryV1().EndpointSlices("mesh").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "mesh", Name: "echo-1", Labels: map[string]string{discoveryv1.LabelServiceName: "echo"}},
		Endpoints:  []discoveryv1.Endpoint{{Addresses: []string{"198.19.1.2"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "b"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("endpoint", func(s *config.Snapshot) error {
		svc, ok := s.ServiceByKey(config.NamespacedHostname{Namespace: "mesh", Hostname: "echo.mesh.svc.cluster.local"})
		if !ok {
			return fmt.Errorf("no service")
		}
		if eps := s.Endpoints(svc); len(eps) != 1 || eps[0].Workload.Name != "b" {
			return fmt.Errorf("endpoints %v", eps)
		}
		return nil
	})
	b, _ := kc.CoreV1().Pods("mesh").Get(ctx, "b", metav1.GetOptions{})
	b.Labels = map[string]string{kube.DefaultEnrollLabel: kube.OptOutValue}
	if _, err := kc.CoreV1().Pods("mesh").Update(ctx, b, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("opt-out", wantEnrolled("a"))
	if err := kc.CoreV1().Pods("mesh").Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("pod deleted", func(s *config.Snapshot) error {
		if _, ok := s.WorkloadByUID(kube.DefaultClusterID + "//Pod/mesh/a"); ok {
			return fmt.Errorf("a still there")
		}
		return nil
	})
	if st.Generation() <= gen || prov.LastError() != nil {
		t.Errorf("generation %d (first %d), last error %v", st.Generation(), gen, prov.LastError())
	}
}
