package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	istioclient "istio.io/client-go/pkg/clientset/versioned"

	"github.com/warren-mesh/warren/internal/netnsx"
)

const (
	release   = "warren"
	agentNS   = "warren-system"
	chartPath = moduleRoot + "/charts/warren"
	ambient   = "istio.io/dataplane-mode"
)

// chartOverrides are the only values the tests change, each because this
// machine lacks what a normal node has. Empty: the chart's defaults work on
// this node; the node-level quirks (no systemd: private mounts, no
// CAP_SYS_RESOURCE, hybrid cgroups) are handled by the harness as a node's
// setup would, not by chart values.
var chartOverrides = []string{}

func TestRealNode(t *testing.T) {
	c, im := startCluster(t)
	ctx := context.Background()
	tn := &realNode{t: t, c: c, ctx: ctx, images: im}
	tn.installIstioCRDs(t)

	t.Run("install", tn.install)
	if t.Failed() {
		tn.dumpAgent()
		return
	}
	t.Run("enroll", tn.enroll)
	tn.logUsage("after enroll")
	if !t.Failed() {
		t.Run("policies", tn.policies)
	}
	// Nothing so far may have crashed the agent.
	tn.assertNoAgentRestarts(t, "after install, enroll and policies")
	if !t.Failed() {
		t.Run("restarts", tn.restarts)
		tn.logUsage("after restarts")
	}
	if t.Failed() {
		tn.dumpAgent()
	}
	t.Run("uninstall", tn.uninstall)
}

type realNode struct {
	t      *testing.T
	c      *Cluster
	ctx    context.Context
	images Images
	istio  istioclient.Interface
	// mesh pods
	serverIP, clusterIP string
}

func (r *realNode) helm(t *testing.T, args ...string) string {
	t.Helper()
	t0 := time.Now()
	out, err := r.c.Helm(r.ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("helm %s: %.1fs", args[0], time.Since(t0).Seconds())
	return out
}

// agentPods returns the agent DaemonSet's pods.
func (r *realNode) agentPods() []corev1.Pod {
	pods, err := r.c.Kube.CoreV1().Pods(agentNS).List(r.ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=warren"})
	if err != nil {
		return nil
	}
	var out []corev1.Pod
	for _, p := range pods.Items {
		for _, ref := range p.OwnerReferences {
			if ref.Kind == "DaemonSet" {
				out = append(out, p)
			}
		}
	}
	return out
}

func (r *realNode) dumpAgent() {
	for _, p := range r.agentPods() {
		for _, cs := range p.Status.ContainerStatuses {
			r.t.Logf("agent pod %s container %s ready=%v state=%+v", p.Name, cs.Name, cs.Ready, cs.State)
		}
		b, err := r.c.Kube.CoreV1().Pods(agentNS).GetLogs(p.Name, &corev1.PodLogOptions{Container: "nodeagent", TailLines: ptr(int64(40))}).DoRaw(r.ctx)
		r.t.Logf("agent %s log (tail, %v):\n%s", p.Name, err, b)
	}
	evs, _ := r.c.Kube.CoreV1().Events(agentNS).List(r.ctx, metav1.ListOptions{})
	for _, e := range evs.Items {
		if e.Type != "Normal" {
			r.t.Logf("event %s %s: %s", e.InvolvedObject.Name, e.Reason, e.Message)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// waitDaemonSetReady waits until the agent DaemonSet has its pod updated and Ready.
func (r *realNode) waitDaemonSetReady(t *testing.T, timeout time.Duration) {
	t.Helper()
	err := waitFor(r.ctx, "DaemonSet ready", timeout, func() error {
		ds, err := r.c.Kube.AppsV1().DaemonSets(agentNS).Get(r.ctx, release, metav1.GetOptions{})
		if err != nil {
			return err
		}
		s := ds.Status
		if s.ObservedGeneration < ds.Generation || s.DesiredNumberScheduled != 1 || s.UpdatedNumberScheduled != 1 || s.NumberReady != 1 || s.NumberAvailable != 1 || s.CurrentNumberScheduled != 1 {
			return fmt.Errorf("status %+v", s)
		}
		if n := len(r.agentPods()); n != 1 {
			return fmt.Errorf("%d agent pods", n)
		}
		return nil
	})
	if err != nil {
		r.dumpAgent()
		t.Fatal(err)
	}
}

func (r *realNode) install(t *testing.T) {
	t0 := time.Now()
	args := append([]string{"install", release, chartPath, "--namespace", agentNS, "--create-namespace", "--wait", "--timeout", "180s"}, chartOverrides...)
	r.helm(t, args...)
	r.waitDaemonSetReady(t, 120*time.Second)
	t.Logf("helm install to DaemonSet Ready: %.1fs", time.Since(t0).Seconds())
	pods := r.agentPods()
	out, errOut, err := r.c.Exec(r.ctx, agentNS, pods[0].Name, "nodeagent", "/usr/local/bin/nodeagent", "doctor")
	t.Logf("nodeagent doctor in %s:\n%s%s", pods[0].Name, out, errOut)
	if err != nil {
		t.Errorf("nodeagent doctor failed in the pod: %v", err)
	}
	logs := r.agentLog(pods[0].Name)
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, `"level":"WARN"`) || strings.Contains(l, `"level":"ERROR"`) {
			t.Logf("agent: %s", l)
		}
	}
}

func (r *realNode) agentLog(pod string) string {
	b, _ := r.c.Kube.CoreV1().Pods(agentNS).GetLogs(pod, &corev1.PodLogOptions{Container: "nodeagent"}).DoRaw(r.ctx)
	return string(b)
}

func (r *realNode) createNS(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	if _, err := r.c.Kube.CoreV1().Namespaces().Create(r.ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Pods need their namespace's default ServiceAccount.
	if err := waitFor(r.ctx, "default ServiceAccount in "+name, 30*time.Second, func() error {
		_, err := r.c.Kube.CoreV1().ServiceAccounts(name).Get(r.ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

func (r *realNode) createPod(t *testing.T, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	if _, err := r.c.Kube.CoreV1().Pods(p.Namespace).Create(r.ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return waitPodReady(t, r.c, p.Namespace, p.Name)
}

// dial connects from inside a pod's network namespace (the test process
// joins it: capture applies to every socket of an enrolled namespace),
// sends msg, half-closes and returns the echo.
func dial(nsPath, addr, msg string, timeout time.Duration) (string, error) {
	var conn net.Conn
	err := netnsx.DoPath(nsPath, func() error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(conn, msg); err != nil {
		return "", err
	}
	conn.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(conn)
	return string(b), err
}

// metrics returns the agent's /metrics (host network, port 15020).
func metrics() (string, error) {
	cl := http.Client{Timeout: 5 * time.Second}
	resp, err := cl.Get("http://" + NodeIP.String() + ":15020/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// counter sums a metric's samples whose labels contain every want pair.
func counter(text, name string, want map[string]string) float64 {
	sum := 0.0
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, k+`="`+v+`"`) {
				ok = false
			}
		}
		if ok {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return sum
}

func (r *realNode) mtlsOpened(dstWorkload, dstNS string) float64 {
	m, err := metrics()
	if err != nil {
		r.t.Logf("metrics: %v", err)
		return -1
	}
	return counter(m, "istio_tcp_connections_opened_total", map[string]string{
		"reporter": "source", "connection_security_policy": "mutual_tls",
		"destination_workload_namespace": dstNS, "destination_workload": dstWorkload,
	})
}

func (r *realNode) annotated(t *testing.T, ns, pod string) bool {
	p, err := r.c.Kube.CoreV1().Pods(ns).Get(r.ctx, pod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p.Annotations["ambient.istio.io/redirection"] == "enabled"
}

func (r *realNode) waitAnnotated(t *testing.T, ns, pod string, want bool) {
	t.Helper()
	err := waitFor(r.ctx, fmt.Sprintf("%s/%s annotated=%v", ns, pod, want), 30*time.Second, func() error {
		if r.annotated(t, ns, pod) != want {
			return errors.New("not yet")
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// expectMTLS dials from a pod and checks the agent counted a mutual-TLS connection to dst.
func (r *realNode) expectMTLS(t *testing.T, what, nsPath, addr, dstWorkload, dstNS string) {
	t.Helper()
	before := r.mtlsOpened(dstWorkload, dstNS)
	var reply string
	var err error
	// The agent sets a pod up a moment after annotating it: retry the first connect briefly.
	for i := 0; i < 20; i++ {
		if reply, err = dial(nsPath, addr, what, 5*time.Second); err == nil && r.mtlsOpened(dstWorkload, dstNS) > before {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil || reply != what {
		t.Errorf("%s: reply %q, err %v", what, reply, err)
		return
	}
	after := r.mtlsOpened(dstWorkload, dstNS)
	t.Logf("%s: echo ok; istio_tcp_connections_opened_total{mutual_tls, dst %s/%s} %v -> %v", what, dstNS, dstWorkload, before, after)
	if after <= before {
		t.Errorf("%s: no mutual_tls connection counted by the agent", what)
	}
}

func (r *realNode) enroll(t *testing.T) {
	mesh, plain := r.c.Prefix+"-mesh", r.c.Prefix+"-plain"
	r.createNS(t, mesh, map[string]string{ambient: "ambient"})
	r.createNS(t, plain, nil)
	labels := map[string]string{"app": "server"}
	srv := r.createPod(t, appPod(mesh, "server", labels, "echo", "-l", ":8080"))
	cli := r.createPod(t, appPod(mesh, "client", nil, "echo", "-l", ":8080"))
	out := r.createPod(t, appPod(mesh, "optout", map[string]string{ambient: "none"}, "echo", "-l", ":8080"))
	pl := r.createPod(t, appPod(plain, "plain", nil, "echo", "-l", ":8080"))
	svc, err := r.c.Kube.CoreV1().Services(mesh).Create(r.ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "server", Namespace: mesh},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r.serverIP, r.clusterIP = srv.Status.PodIP, svc.Spec.ClusterIP
	t.Logf("server %s, ClusterIP %s, client %s, optout %s, plain %s", srv.Status.PodIP, svc.Spec.ClusterIP, cli.Status.PodIP, out.Status.PodIP, pl.Status.PodIP)

	r.waitAnnotated(t, mesh, "server", true)
	r.waitAnnotated(t, mesh, "client", true)
	time.Sleep(2 * time.Second) // the agent annotates, then lists; give the optout and plain pods the same chance
	if r.annotated(t, mesh, "optout") {
		t.Error("pod labelled istio.io/dataplane-mode=none was annotated")
	}
	if r.annotated(t, plain, "plain") {
		t.Error("pod of an unlabelled namespace was annotated")
	}
	cliNS, err := r.c.PodNetns(r.ctx, mesh, "client", "app")
	if err != nil {
		t.Fatal(err)
	}
	r.expectMTLS(t, "pod->pod", cliNS, r.serverIP+":8080", "server", mesh)
	r.expectMTLS(t, "pod->ClusterIP", cliNS, r.clusterIP+":80", "server", mesh)

	// Outside the mesh: the opt-out pod and the unlabelled namespace's pod talk
	// plaintext, and the agent counts nothing for them.
	for _, p := range []struct{ ns, name, ip string }{{mesh, "optout", out.Status.PodIP}, {plain, "plain", pl.Status.PodIP}} {
		nsPath, err := r.c.PodNetns(r.ctx, p.ns, p.name, "app")
		if err != nil {
			t.Fatal(err)
		}
		m0, _ := metrics()
		src := counter(m0, "istio_tcp_connections_opened_total", map[string]string{"source_workload": p.name})
		other := pl.Status.PodIP
		if p.name == "plain" {
			other = out.Status.PodIP
		}
		if reply, err := dial(nsPath, other+":8080", "x", 5*time.Second); err != nil || reply != "x" {
			t.Errorf("%s -> %s: %q %v", p.name, other, reply, err)
		}
		m1, _ := metrics()
		if got := counter(m1, "istio_tcp_connections_opened_total", map[string]string{"source_workload": p.name}); got != src {
			t.Errorf("%s/%s (outside the mesh) has agent metrics as a source: %v -> %v", p.ns, p.name, src, got)
		}
	}

	// Removing the namespace label stops capture live: the annotation goes and
	// a new connection is plaintext, not counted.
	patch := []byte(`{"metadata":{"labels":{"` + ambient + `":null}}}`)
	if _, err := r.c.Kube.CoreV1().Namespaces().Patch(r.ctx, mesh, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	r.waitAnnotated(t, mesh, "client", false)
	r.waitAnnotated(t, mesh, "server", false)
	time.Sleep(time.Second)
	before := r.mtlsOpened("server", mesh)
	if reply, err := dial(cliNS, r.serverIP+":8080", "direct", 5*time.Second); err != nil || reply != "direct" {
		t.Errorf("after unlabelling: %q %v", reply, err)
	}
	if after := r.mtlsOpened("server", mesh); after != before {
		t.Errorf("after unlabelling the namespace, a connection was still captured (%v -> %v)", before, after)
	} else {
		t.Logf("namespace unlabelled: annotations removed, client->server direct (mutual_tls count stays %v)", after)
	}
	// Label it again for the next steps.
	patch = []byte(`{"metadata":{"labels":{"` + ambient + `":"ambient"}}}`)
	if _, err := r.c.Kube.CoreV1().Namespaces().Patch(r.ctx, mesh, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	r.waitAnnotated(t, mesh, "client", true)
	r.waitAnnotated(t, mesh, "server", true)
}

// logUsage logs the agent's CPU and memory as the kubelet reports them (summary API).
func (r *realNode) logUsage(when string) {
	b, err := r.c.Kube.CoreV1().RESTClient().Get().AbsPath("/api/v1/nodes/" + r.c.Node + "/proxy/stats/summary").DoRaw(r.ctx)
	if err != nil {
		r.t.Logf("summary API: %v", err)
		return
	}
	var s struct {
		Pods []struct {
			PodRef     struct{ Name, Namespace string }
			Containers []struct {
				Name string
				CPU  struct {
					UsageNanoCores       *uint64
					UsageCoreNanoSeconds *uint64
				}
				Memory struct{ WorkingSetBytes, RSSBytes *uint64 }
			}
		}
	}
	if err := json.Unmarshal(b, &s); err != nil {
		r.t.Logf("summary API: %v", err)
		return
	}
	for _, p := range s.Pods {
		if p.PodRef.Namespace != agentNS {
			continue
		}
		for _, c := range p.Containers {
			v := func(p *uint64) float64 {
				if p == nil {
					return -1
				}
				return float64(*p)
			}
			r.t.Logf("usage %s: pod %s container %s: cpu %.1f millicores (total %.2f s), memory working set %.1f MiB, rss %.1f MiB",
				when, p.PodRef.Name, c.Name, v(c.CPU.UsageNanoCores)/1e6, v(c.CPU.UsageCoreNanoSeconds)/1e9,
				v(c.Memory.WorkingSetBytes)/(1<<20), v(c.Memory.RSSBytes)/(1<<20))
		}
	}
}

var (
	_ = os.Getenv
	_ = filepath.Join
	_ = regexp.MustCompile
	_ = syscall.ECONNREFUSED
)
