package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/warren-mesh/warren/internal/testenv"
)

const moduleRoot = "../.."

// startCluster builds the images and starts a cluster for the test; it is
// removed at the test's end.
func startCluster(t *testing.T) (*Cluster, Images) {
	t.Helper()
	if os.Getenv("WARREN_REALNODE") == "0" {
		t.Skip("WARREN_REALNODE=0: real-node tests skipped")
	}
	testenv.RequireRoot(t)
	if _, err := Binaries(ToolsDir()); err != nil {
		testenv.SkipOrFail(t, "%v", err)
	}
	ctx := context.Background()
	agentRef, err := AgentRef(moduleRoot)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	im, err := BuildImages(ctx, moduleRoot, t.TempDir(), agentRef)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("images built in %.1fs", time.Since(t0).Seconds())
	existed := map[string]bool{}
	for _, p := range hostPathsChecked {
		_, err := os.Lstat(p)
		existed[p] = err == nil
	}
	sysctlsBefore := map[string]string{}
	for _, k := range append(append([]string{}, kubeletSysctls...), hostSysctls...) {
		sysctlsBefore[k], _ = readSysctl(k)
	}
	t0 = time.Now()
	c, err := Start(ctx, Config{
		Images:     []string{im.Pause, im.App, im.Agent},
		PauseImage: PauseRef,
		// The chart's HostToContainer volumes (bpffs, /var/run/netns) need
		// shared sources, as systemd makes them on a normal node ("/" is
		// rshared); this VM has no systemd and every mount is private.
		SharedMounts: []string{"/", "/sys/fs/bpf"},
		Logf:         t.Logf,
	})
	t.Cleanup(func() {
		if t.Failed() && c != nil {
			for _, n := range []string{"kubelet", "containerd", "kube-apiserver"} {
				if b, err := os.ReadFile(c.Logs(n)); err == nil {
					lines := strings.Split(string(b), "\n")
					if len(lines) > 30 {
						lines = lines[len(lines)-30:]
					}
					t.Logf("--- %s log (tail) ---\n%s", n, strings.Join(lines, "\n"))
				}
			}
		}
		t0 := time.Now()
		if err := c.Stop(context.Background()); err != nil {
			t.Errorf("cluster stop: %v", err)
		}
		t.Logf("cluster removed in %.1fs", time.Since(t0).Seconds())
		if c != nil {
			checkNoLeftovers(t, c.Prefix, sysctlsBefore, existed)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cluster %s up in %.1fs (node %s, kubeconfig %s)", c.Prefix, time.Since(t0).Seconds(), c.Node, c.Kubeconfig)
	return c, im
}

func TestClusterSmoke(t *testing.T) {
	c, _ := startCluster(t)
	ctx := context.Background()
	ns := c.Prefix + "-smoke"
	if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Pods need their namespace's default ServiceAccount (the controller-manager makes it).
	if err := waitFor(ctx, "default ServiceAccount", 30*time.Second, func() error {
		_, err := c.Kube.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	pod := appPod(ns, "echo", nil, "echo", "-l", ":8080")
	if _, err := c.Kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p := waitPodReady(t, c, ns, "echo")
	out, errOut, err := c.Exec(ctx, ns, "echo", "app", "/usr/local/bin/labapp", "probe", "-c", p.Status.PodIP+":8080", "-m", "hi")
	t.Logf("probe: %s %s %v", out, errOut, err)
	if err != nil {
		t.Fatal(err)
	}
}

func appPod(ns, name string, labels map[string]string, args ...string) *corev1.Pod {
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name: "app", Image: AppRef, ImagePullPolicy: corev1.PullNever, Args: args,
			}},
		},
	}
}

func waitPodReady(t *testing.T, c *Cluster, ns, name string) *corev1.Pod {
	t.Helper()
	var p *corev1.Pod
	err := waitFor(context.Background(), "pod "+ns+"/"+name+" Ready", 120*time.Second, func() error {
		var err error
		p, err = c.Kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return fmt.Errorf("phase %s %v", p.Status.Phase, p.Status.ContainerStatuses)
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// checkNoLeftovers fails the test if the run left anything on the host.
// hostPathsChecked are host paths the node's components create when missing.
var hostPathsChecked = []string{"/sys/fs/bpf/warren", "/var/run/warren", "/run/containerd", "/var/lib/cni"}

func checkNoLeftovers(t *testing.T, prefix string, sysctls map[string]string, existed map[string]bool) {
	t.Helper()
	if l, _ := Leftovers(); slices.Contains(l, prefix) {
		t.Errorf("leftovers of run %s on the host (bridge, cgroups, state or lock)", prefix)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mi), prefix) || strings.Contains(string(mi), "/warren/cgroupv2") {
		t.Errorf("mounts of run %s left", prefix)
	}
	for _, p := range append(hostPathsChecked, filepath.Join(stateRoot, prefix)) {
		if _, err := os.Lstat(p); err == nil && !existed[p] {
			t.Errorf("%s left on the host", p)
		}
	}
	if entries, _ := os.ReadDir(netnsDir); len(entries) > 0 {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "cni-") {
				t.Errorf("network namespace %s left", e.Name())
			}
		}
	}
	if out, err := exec.Command("nft", "list", "tables").Output(); err == nil && strings.Contains(string(out), "kube-proxy") {
		t.Errorf("nft tables of kube-proxy left: %s", out)
	}
	for k, v := range sysctls {
		if now, _ := readSysctl(k); now != v {
			t.Errorf("sysctl %s is %s, was %s", k, now, v)
		}
	}
}
