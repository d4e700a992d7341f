package cluster

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apiextclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/warren-mesh/warren/pkg/config/kube/kubetest"
)

// installIstioCRDs installs Istio's security CRDs (pkg/config/kube/kubetest)
// before the chart, so the agent serves policies from its start.
func (r *realNode) installIstioCRDs(t *testing.T) {
	crds, err := kubetest.CRDs()
	if err != nil {
		t.Fatal(err)
	}
	cl, err := apiextclient.NewForConfig(r.c.Rest)
	if err != nil {
		t.Fatal(err)
	}
	for _, crd := range crds {
		if _, err := cl.ApiextensionsV1().CustomResourceDefinitions().Create(r.ctx, crd, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	if r.istio, err = istioclient.NewForConfig(r.c.Rest); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(r.ctx, "Istio CRDs served", 30*time.Second, func() error {
		_, err := r.istio.SecurityV1().PeerAuthentications("default").List(r.ctx, metav1.ListOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

func (r *realNode) policies(t *testing.T) {
	mesh, plain := r.c.Prefix+"-mesh", r.c.Prefix+"-plain"
	// A client with its own ServiceAccount, denied by an AuthorizationPolicy on the server.
	if _, err := r.c.Kube.CoreV1().ServiceAccounts(mesh).Create(r.ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "denied"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dp := appPod(mesh, "denied", nil, "echo", "-l", ":8080")
	dp.Spec.ServiceAccountName = "denied"
	r.createPod(t, dp)
	r.waitAnnotated(t, mesh, "denied", true)
	ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny-denied", Namespace: mesh},
		Spec: securityapi.AuthorizationPolicy{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "server"}},
			Action:   securityapi.AuthorizationPolicy_DENY,
			Rules:    []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{"cluster.local/ns/" + mesh + "/sa/denied"}}}}}},
		}}
	if _, err := r.istio.SecurityV1().AuthorizationPolicies(mesh).Create(r.ctx, ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deniedNS, err := r.c.PodNetns(r.ctx, mesh, "denied", "app")
	if err != nil {
		t.Fatal(err)
	}
	cliNS, _ := r.c.PodNetns(r.ctx, mesh, "client", "app")
	if err := waitFor(r.ctx, "denied client refused", 30*time.Second, func() error {
		if reply, err := dial(deniedNS, r.serverIP+":8080", "deny-me", 5*time.Second); err == nil && reply == "deny-me" {
			return fmt.Errorf("denied client got its echo")
		}
		return nil
	}); err != nil {
		t.Error(err)
	} else {
		reply, err := dial(deniedNS, r.serverIP+":8080", "deny-me", 5*time.Second)
		t.Logf("AuthorizationPolicy DENY: denied client -> server: reply %q, err %v", reply, err)
	}
	if reply, err := dial(cliNS, r.serverIP+":8080", "allowed", 5*time.Second); err != nil || reply != "allowed" {
		t.Errorf("allowed client -> server: %q %v", reply, err)
	}

	// A STRICT pod with kubelet liveness and readiness probes.
	sp := appPod(mesh, "strict", map[string]string{"app": "strict"}, "echo", "-l", ":8080")
	probe := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}},
		PeriodSeconds: 1, FailureThreshold: 2, TimeoutSeconds: 1}
	sp.Spec.Containers[0].LivenessProbe, sp.Spec.Containers[0].ReadinessProbe = probe, probe
	pa := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Name: "strict", Namespace: mesh},
		Spec: securityapi.PeerAuthentication{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "strict"}},
			Mtls:     &securityapi.PeerAuthentication_MutualTLS{Mode: securityapi.PeerAuthentication_MutualTLS_STRICT}}}
	if _, err := r.istio.SecurityV1().PeerAuthentications(mesh).Create(r.ctx, pa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	st := r.createPod(t, sp)
	r.waitAnnotated(t, mesh, "strict", true)
	plainNS, err := r.c.PodNetns(r.ctx, plain, "plain", "app")
	if err != nil {
		t.Fatal(err)
	}
	if err := waitFor(r.ctx, "plaintext refused by STRICT", 30*time.Second, func() error {
		if reply, err := dial(plainNS, st.Status.PodIP+":8080", "plain", 3*time.Second); err == nil && reply == "plain" {
			return fmt.Errorf("plaintext from an unenrolled pod got its echo")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	reply, err := dial(plainNS, st.Status.PodIP+":8080", "plain", 3*time.Second)
	t.Logf("PeerAuthentication STRICT: unenrolled pod -> strict pod: reply %q, err %v", reply, err)
	r.expectMTLS(t, "enrolled client -> STRICT pod", cliNS, st.Status.PodIP+":8080", "strict", mesh)
	// The kubelet's probes keep passing for 10 s (period 1 s, 2 failures fail them).
	time.Sleep(10 * time.Second)
	p, err := r.c.Kube.CoreV1().Pods(mesh).Get(r.ctx, "strict", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cs := p.Status.ContainerStatuses[0]
	if !cs.Ready || cs.RestartCount != 0 {
		t.Errorf("STRICT pod: ready %v, restarts %d (the kubelet's probes failed)", cs.Ready, cs.RestartCount)
	} else {
		t.Logf("STRICT pod: kubelet liveness and readiness probes passing (ready, 0 restarts after 10 s of 1 s probes)")
	}
}

// connLoop opens new connections from a pod to addr until stop, counting
// outcomes: echoed, refused, reset, other failures.
type loopCounts struct{ ok, refused, reset, timeout, other atomic.Int64 }

func (l *loopCounts) String() string {
	return fmt.Sprintf("ok %d, refused %d, reset %d, timeout %d, other %d", l.ok.Load(), l.refused.Load(), l.reset.Load(), l.timeout.Load(), l.other.Load())
}

func connLoop(nsPath, addr string, stop <-chan struct{}, lastErr *atomic.Value) *loopCounts {
	c := &loopCounts{}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			reply, err := dial(nsPath, addr, "loop", 5*time.Second)
			switch {
			case err == nil && reply == "loop":
				c.ok.Add(1)
			case err != nil && strings.Contains(err.Error(), "connection refused"):
				c.refused.Add(1)
			case err != nil && (strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "broken pipe")):
				c.reset.Add(1)
			case err != nil && strings.Contains(err.Error(), "timeout"):
				c.timeout.Add(1)
			default:
				c.other.Add(1)
			}
			if err != nil || reply != "loop" {
				lastErr.Store(fmt.Sprintf("reply %q err %v", reply, err))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	go func() { <-stop; wg.Wait() }()
	return c
}

// underLoop runs action while a loop of new connections goes from the client
// to the server, then logs the counts.
func (r *realNode) underLoop(t *testing.T, what string, action func()) *loopCounts {
	mesh := r.c.Prefix + "-mesh"
	cliNS, err := r.c.PodNetns(r.ctx, mesh, "client", "app")
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var last atomic.Value
	counts := connLoop(cliNS, r.serverIP+":8080", stop, &last)
	time.Sleep(time.Second)
	t0 := time.Now()
	action()
	time.Sleep(2 * time.Second)
	close(stop)
	time.Sleep(200 * time.Millisecond)
	t.Logf("%s (%.1fs): new connections client->server: %s; last failure: %v", what, time.Since(t0).Seconds(), counts, last.Load())
	return counts
}

func (r *realNode) restarts(t *testing.T) {
	// helm upgrade to a new image tag: the same image under another tag.
	agentRef, _ := AgentRef(moduleRoot)
	repo, _, _ := strings.Cut(agentRef, ":")
	newTag := "0.1.0-rn2"
	im := r.images
	if err := r.retag(repo+":"+newTag, im); err != nil {
		t.Fatal(err)
	}
	oldPod := r.agentPods()[0].Name
	links := pinnedLinks(t)
	up := r.underLoop(t, "helm upgrade --set image.tag="+newTag, func() {
		args := append([]string{"upgrade", release, chartPath, "--namespace", agentNS, "--reuse-values", "--set", "image.tag=" + newTag, "--wait", "--timeout", "180s"}, chartOverrides...)
		r.helm(t, args...)
		r.waitDaemonSetReady(t, 120*time.Second)
		waitFor(r.ctx, "old agent gone", 90*time.Second, func() error {
			for _, p := range r.agentPods() {
				if p.Name == oldPod {
					return fmt.Errorf("%s still there", oldPod)
				}
			}
			return nil
		})
	})
	r.assertNoRefusals(t, "helm upgrade", up)
	r.assertNoAgentRestarts(t, "after helm upgrade")
	samePins(t, "helm upgrade", links)
	pods := r.agentPods()
	if len(pods) != 1 || !strings.HasSuffix(pods[0].Spec.Containers[len(pods[0].Spec.Containers)-1].Image, newTag) && !anyImage(pods[0], newTag) {
		t.Errorf("after upgrade: agent pods %d, want one running tag %s", len(pods), newTag)
	}
	old := pods[0].Name
	del := r.underLoop(t, "kubectl delete pod "+old, func() {
		if err := r.c.Kube.CoreV1().Pods(agentNS).Delete(r.ctx, old, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(r.ctx, "replacement agent", 120*time.Second, func() error {
			ps := r.agentPods()
			if len(ps) != 1 || ps[0].Name == old {
				return fmt.Errorf("%d pods", len(ps))
			}
			return nil
		})
		r.waitDaemonSetReady(t, 120*time.Second)
	})
	r.assertNoRefusals(t, "kubectl delete pod", del)
	r.assertNoAgentRestarts(t, "after kubectl delete pod")
	samePins(t, "kubectl delete pod", links)
}

// pinnedLinks maps each link pinned under /sys/fs/bpf/warren to its link ID.
func pinnedLinks(t *testing.T) map[string]link.ID {
	t.Helper()
	ents, err := os.ReadDir("/sys/fs/bpf/warren")
	if err != nil {
		t.Fatalf("pins: %v", err)
	}
	ids := map[string]link.ID{}
	for _, e := range ents {
		lk, err := link.LoadPinnedLink("/sys/fs/bpf/warren/"+e.Name(), nil)
		if err != nil {
			continue // a map or the netns directory
		}
		if info, err := lk.Info(); err == nil {
			ids[e.Name()] = info.ID
		}
		lk.Close()
	}
	if len(ids) == 0 {
		t.Fatal("no link pinned under /sys/fs/bpf/warren")
	}
	return ids
}

// samePins checks that a restart kept the very links pinned before it (an
// uninstall would have removed them; a new agent would pin new IDs).
func samePins(t *testing.T, what string, before map[string]link.ID) {
	t.Helper()
	after := pinnedLinks(t)
	for name, id := range before {
		if after[name] != id {
			t.Errorf("after %s, pinned link %s is ID %d, was %d: capture was not kept across the restart", what, name, after[name], id)
		}
	}
	t.Logf("after %s: the %d pinned cgroup links are the same (IDs unchanged)", what, len(before))
}

func anyImage(p corev1.Pod, tag string) bool {
	for _, c := range p.Spec.Containers {
		if strings.HasSuffix(c.Image, ":"+tag) {
			return true
		}
	}
	return false
}

func (r *realNode) retag(ref string, im Images) error {
	out, err := exec.Command(r.c.Bin["ctr"], "--address", r.c.ContainerdSock, "-n", "k8s.io", "images", "tag", "--force", mustAgentRef(), ref).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images tag: %v: %s", err, out)
	}
	return nil
}

func mustAgentRef() string { r, _ := AgentRef(moduleRoot); return r }

// uninstall: helm uninstall under a loop of new connections; the agent,
// stopped with its DaemonSet deleted and no successor, removes capture from
// the node itself (cmd/nodeagent/owner.go); then the node is as before the
// install.
func (r *realNode) uninstall(t *testing.T) {
	mesh := r.c.Prefix + "-mesh"
	pods := r.agentPods()
	if len(pods) != 1 {
		t.Fatalf("%d agent pods before uninstall", len(pods))
	}
	// The agent's log, followed: its pod is gone once we look.
	logc := make(chan string, 1)
	go func() {
		rc, err := r.c.Kube.CoreV1().Pods(agentNS).GetLogs(pods[0].Name, &corev1.PodLogOptions{Container: "nodeagent", Follow: true}).Stream(r.ctx)
		if err != nil {
			logc <- "follow log: " + err.Error()
			return
		}
		defer rc.Close()
		b, _ := io.ReadAll(rc)
		logc <- string(b)
	}()
	counts := r.underLoop(t, "helm uninstall", func() {
		r.helm(t, "uninstall", release, "--namespace", agentNS, "--wait", "--timeout", "120s")
		if err := waitFor(r.ctx, "agent pods gone", 120*time.Second, func() error {
			pods, _ := r.c.Kube.CoreV1().Pods(agentNS).List(r.ctx, metav1.ListOptions{})
			if len(pods.Items) > 0 {
				return fmt.Errorf("%d pods left", len(pods.Items))
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
	})
	// New connects are proxied until the agent uninstalls, then go direct:
	// none is refused or reset on the way.
	r.assertNoRefusals(t, "helm uninstall", counts)
	var agentLog string
	select {
	case agentLog = <-logc:
	case <-time.After(10 * time.Second):
		agentLog = "(log stream still open)"
	}
	var said []string
	for _, l := range strings.Split(agentLog, "\n") {
		if strings.Contains(l, "uninstall") || strings.Contains(l, "DaemonSet") || strings.Contains(l, "shutting down") {
			said = append(said, l)
		}
	}
	t.Logf("the agent on helm uninstall (%d bytes of log followed):\n%s", len(agentLog), strings.Join(said, "\n"))

	left := false
	if entries, err := os.ReadDir("/sys/fs/bpf/warren"); err == nil {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("after helm uninstall, pins left in /sys/fs/bpf/warren: %v", names)
		left = true
	} else if !os.IsNotExist(err) {
		t.Errorf("read /sys/fs/bpf/warren: %v", err)
	}
	cliNS, err := r.c.PodNetns(r.ctx, mesh, "client", "app")
	if err != nil {
		t.Fatal(err)
	}
	srvNS, err := r.c.PodNetns(r.ctx, mesh, "server", "app")
	if err != nil {
		t.Fatal(err)
	}
	if progs, err := warrenPrograms(unifiedRoot(), cliNS, srvNS); err != nil {
		t.Errorf("query attached programs: %v", err)
	} else if len(progs) > 0 {
		t.Errorf("after helm uninstall, warren programs still attached: %v", progs)
		left = true
	} else {
		t.Logf("after helm uninstall: no pins under /sys/fs/bpf/warren, no warren program on the host's cgroup2 root (%d attach types) nor in the client's and server's network namespaces (sk_lookup)", len(cgroupAttachTypes))
	}
	if left {
		// Leave the node clean for the next tests all the same.
		out, err := exec.Command(r.images.AgentBin, "uninstall", "--pin-dir", "/sys/fs/bpf/warren", "--state-dir", "/var/run/warren").CombinedOutput()
		t.Logf("nodeagent uninstall on the node (cleanup after the failure): %v\n%s", err, out)
	}
	if reply, err := dial(cliNS, r.serverIP+":8080", "direct", 5*time.Second); err != nil || reply != "direct" {
		t.Errorf("after uninstall, client -> server (direct): %q %v", reply, err)
	} else {
		t.Logf("after uninstall: client -> server talks directly")
	}
	if reply, err := dial(cliNS, r.clusterIP+":80", "direct", 5*time.Second); err != nil || reply != "direct" {
		t.Errorf("after uninstall, client -> ClusterIP (kube-proxy): %q %v", reply, err)
	}
	// No listener of the agent or its holder is left in the pods.
	for _, port := range []string{"15001", "15006", "15008"} {
		if _, err := dial(cliNS, r.serverIP+":"+port, "x", 3*time.Second); err == nil || !strings.Contains(err.Error(), "refused") {
			t.Errorf("after uninstall, server pod port %s: %v (want connection refused: nothing listens)", port, err)
		}
	}
	if ms, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(ms), "/var/run/warren/cgroupv2") || strings.Contains(string(ms), "/run/warren/cgroupv2") {
		t.Errorf("after uninstall, a cgroup2 mount of the agent is left on the host")
	}
}

// cgroupAttachTypes are the cgroup hooks warren attaches (pkg/loader).
var cgroupAttachTypes = []ebpf.AttachType{
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt,
	ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername, ebpf.AttachCgroupInet4GetSockname, ebpf.AttachCgroupInet6GetSockname,
}

// warrenPrograms lists the programs named wr_* attached at the cgroup (each
// of warren's hooks) and, as sk_lookup, in the network namespaces.
func warrenPrograms(cgroup string, netns ...string) ([]string, error) {
	var out []string
	names := func(where string, r *link.QueryResult) {
		for _, p := range r.Programs {
			prog, err := ebpf.NewProgramFromID(p.ID)
			if err != nil {
				continue // detached meanwhile
			}
			info, err := prog.Info()
			prog.Close()
			if err == nil && strings.HasPrefix(info.Name, "wr_") {
				out = append(out, where+": "+info.Name)
			}
		}
	}
	f, err := os.Open(cgroup)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	for _, at := range cgroupAttachTypes {
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			return nil, fmt.Errorf("query %s at %s: %w", at, cgroup, err)
		}
		names(cgroup, r)
	}
	for _, ns := range netns {
		nf, err := os.Open(ns)
		if err != nil {
			return nil, err
		}
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(nf.Fd()), Attach: ebpf.AttachSkLookup})
		nf.Close()
		if err != nil {
			return nil, fmt.Errorf("query sk_lookup in %s: %w", ns, err)
		}
		names(ns, r)
	}
	return out, nil
}

// assertNoRefusals checks the README's promise for a restart ("SIGTERM never
// refuses or resets a new connect"): of the loop's new connections none was
// refused or reset, and some went through. Timeouts are reported, not
// failed: the promise is about refusals and resets, and a loaded test
// machine can delay a connect past the loop's 5 s.
func (r *realNode) assertNoRefusals(t *testing.T, what string, c *loopCounts) {
	t.Helper()
	if c.ok.Load() == 0 {
		t.Errorf("%s: no connection went through (%s)", what, c)
	}
	if c.refused.Load() != 0 || c.reset.Load() != 0 || c.other.Load() != 0 {
		t.Errorf("%s: new connections refused %d, reset %d, other failures %d, want 0 (%s)", what, c.refused.Load(), c.reset.Load(), c.other.Load(), c)
	}
}

// assertNoAgentRestarts checks that the agent's containers (the agent and
// its listener holder) never restarted, and reports the counts.
func (r *realNode) assertNoAgentRestarts(t *testing.T, when string) {
	t.Helper()
	for _, p := range r.agentPods() {
		var counts []string
		for _, cs := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
			counts = append(counts, fmt.Sprintf("%s %d", cs.Name, cs.RestartCount))
			if cs.RestartCount != 0 {
				t.Errorf("%s: agent pod %s container %s restarted %d times (last state %+v)", when, p.Name, cs.Name, cs.RestartCount, cs.LastTerminationState)
			}
		}
		t.Logf("%s: agent pod %s container restarts: %s", when, p.Name, strings.Join(counts, ", "))
	}
}
