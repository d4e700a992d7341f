package kube

import (
	"fmt"
	"reflect"
	"runtime"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

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

// benchModel fills informer stores (with the provider's indexes) with
// benchInputs(n), publishes the full conversion as the provider's first
// batch does, and returns the stores and the model. This node (node-1)
// runs n/1,000 of the pods.
func benchModel(b *testing.B, n int) (*fakeCaches, *model) {
	opts := testOpts()
	opts.node = "node-1"
	f := newFakeCaches(opts, true)
	in := benchInputs(n)
	for _, ns := range in.Namespaces {
		f.put(f.c.namespaces, ns.Name, ns)
	}
	for _, pod := range in.Pods {
		f.putPod(pod.Namespace+"/"+pod.Name, pod, 0)
	}
	for _, s := range in.Services {
		f.put(f.c.services, s.Namespace+"/"+s.Name, s)
	}
	for _, es := range in.EndpointSlices {
		f.put(f.c.slices, es.Namespace+"/"+es.Name, es)
	}
	f.events.take()
	out := convert(f.c.inputs(), opts)
	snap, err := config.NewSnapshot(out.cfg, config.Options{Node: opts.node, CheckNetns: func(string) error { return nil }})
	if err != nil {
		b.Fatal(err)
	}
	m := &model{c: f.c, conv: opts}
	m.reset(&out, snap)
	return f, m
}

// applyOneChange takes the recorded events, and applies their difference to
// the model's snapshot: it must be a one-item delta, none of it rejected.
func applyOneChange(b *testing.B, f *fakeCaches, m *model) {
	ch := f.events.take()
	st := m.diff(&ch, f.c.local())
	next, rejected, _ := m.apply(st)
	if len(rejected) > 0 || st.delta.Len() != 1 {
		b.Fatalf("delta of %d items, rejected %v", st.delta.Len(), rejected)
	}
	m.snap = next
}

// BenchmarkIncremental is what the provider does for a batch holding one
// change now: record the informer event, recompute what it reaches (and
// this node's pods), and apply the difference to the last snapshot.
// Compare with BenchmarkRebuild, the full conversion it replaces.
func BenchmarkIncremental(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprint("pod-", n), func(b *testing.B) {
			f, m := benchModel(b, n)
			i := 0
			for b.Loop() {
				// A remote pod's readiness flips (a different pod each time).
				key := fmt.Sprint("ns-", (i*7919%n)/5%200, "/pod-", i*7919%n)
				obj, _, _ := f.c.pods.GetByKey(key)
				pod := obj.(*corev1.Pod).DeepCopy()
				if len(pod.Status.Conditions) == 0 {
					pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
				} else {
					pod.Status.Conditions = nil
				}
				f.putPod(key, pod, 0)
				applyOneChange(b, f, m)
				i++
			}
		})
		b.Run(fmt.Sprint("slice-", n), func(b *testing.B) {
			f, m := benchModel(b, n)
			i := 0
			for b.Loop() {
				// An EndpointSlice loses its last endpoint, or gets it back.
				j := i * 7919 % (n / 5)
				key := fmt.Sprint("ns-", j%200, "/svc-", j, "-x")
				obj, _, _ := f.c.slices.GetByKey(key)
				es := obj.(*discoveryv1.EndpointSlice).DeepCopy()
				if len(es.Endpoints) == 5 {
					es.Endpoints = es.Endpoints[:4]
				} else {
					es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: fmt.Sprint("pod-", 5*j+4)}})
				}
				f.put(f.c.slices, key, es)
				applyOneChange(b, f, m)
				i++
			}
		})
	}
}

// BenchmarkRetained reports what the provider keeps besides the informer
// stores and the snapshot at 100,000 pods: the indexes the incremental
// path adds (index-MB, of which podip-MB for pods by address), and the
// converted model the full rebuild kept beside the snapshot to compare
// with (lastcfg-MB, gone).
// Live heap after two GCs; run with -benchtime 1x.
func BenchmarkRetained(b *testing.B) {
	live := func() float64 {
		var ms runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return float64(ms.HeapAlloc) / (1 << 20)
	}
	for b.Loop() {
		in := benchInputs(100_000)
		pods := cache.NewIndexer(cache.MetaNamespaceKeyFunc, nsIndexers)
		slices := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
		for _, pod := range in.Pods {
			_ = pods.Add(slimPod(pod))
		}
		for _, es := range in.EndpointSlices {
			_ = slices.Add(es)
		}
		before := live()
		c := newCaches("n1", nil, pods, nil, nil, slices, nil, nil)
		for _, obj := range pods.List() {
			c.observe(pods, nil, obj)
		}
		podIndex := live() - before
		for _, obj := range slices.List() {
			c.observe(slices, nil, obj)
		}
		index := live() - before
		opts := testOpts()
		out := convert(in, opts)
		snap, err := config.NewSnapshot(out.cfg, config.Options{Node: opts.node, CheckNetns: func(string) error { return nil }})
		if err != nil {
			b.Fatal(err)
		}
		withCfg := live()
		runtime.KeepAlive(&out)
		out = converted{}
		lastCfg := withCfg - live()
		runtime.KeepAlive(snap)
		runtime.KeepAlive(in)
		runtime.KeepAlive(pods)
		runtime.KeepAlive(slices)
		runtime.KeepAlive(c)
		b.ReportMetric(index, "index-MB")
		b.ReportMetric(podIndex, "podip-MB")
		b.ReportMetric(lastCfg, "lastcfg-MB")
	}
}
