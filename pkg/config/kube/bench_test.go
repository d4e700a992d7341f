package kube

import (
	"fmt"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/warren-mesh/warren/pkg/config"
)

// benchInputs is a mesh of n pods (in 200 ambient namespaces, on 1,000
// nodes) and n/5 services with one EndpointSlice each, five pods per
// service, as the informer caches hold it.
func benchInputs(n int) Inputs {
	var in Inputs
	for i := range 200 {
		in.Namespaces = append(in.Namespaces, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprint("ns-", i),
			Labels: map[string]string{DefaultEnrollLabel: DefaultEnrollValue}}})
	}
	port := int32(8080)
	for j := range n / 5 {
		ns := fmt.Sprint("ns-", j%200)
		name := fmt.Sprint("svc-", j)
		in.Services = append(in.Services, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: fmt.Sprintf("172.16.%d.%d", j/256, j%256),
				Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}}})
		es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-x",
			Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			Ports: []discoveryv1.EndpointPort{{Port: &port}}}
		for k := range 5 {
			i := 5*j + k
			pname := fmt.Sprint("pod-", i)
			in.Pods = append(in.Pods, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: pname, UID: types.UID(fmt.Sprint("uid-", i))},
				Spec:   corev1.PodSpec{NodeName: fmt.Sprint("node-", 1+i%1000), ServiceAccountName: "sa"},
				Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: fmt.Sprintf("10.%d.%d.%d", i>>16, (i>>8)&255, i&255)}}}})
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.%d.%d.%d", i>>16, (i>>8)&255, i&255)},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: pname}})
		}
		in.EndpointSlices = append(in.EndpointSlices, es)
	}
	return in
}

// BenchmarkRebuild is what the Kubernetes provider does for every
// (debounced) batch of changes, whatever its size: convert every cached
// object, compare the model with the last one, and (when it differs)
// validate and index it with NewSnapshot. O(mesh) per change: compare with
// config's BenchmarkApplyOneWorkload100k for the incremental path.
func BenchmarkRebuild(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprint(n, "pods"), func(b *testing.B) {
			in := benchInputs(n)
			opts := testOpts()
			last := convert(in, opts).cfg
			b.ResetTimer()
			for b.Loop() {
				out := convert(in, opts)
				_ = reflect.DeepEqual(&last, &out.cfg) // walks both models in full when they are equal
				if _, err := config.NewSnapshot(out.cfg, config.Options{Node: opts.node, CheckNetns: func(string) error { return nil }}); err != nil {
					b.Fatal(err)
				}
				last = out.cfg
			}
		})
	}
}
