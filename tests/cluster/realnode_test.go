package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
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
	if os.Getenv("WARREN_REALNODE") != "1" {
		t.Skip("real-node tests run with WARREN_REALNODE=1 (not yet part of make test)")
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

var _ = filepath.Join
