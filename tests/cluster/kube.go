package cluster

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Exec runs a command in a pod's container, as kubectl exec does (the
// kubelet's CRI exec is containerd running a process with the container's
// own process spec: namespaces, capabilities, seccomp), through the run's
// containerd directly: the tests need no kubectl and no SPDY client.
func (c *Cluster) Exec(ctx context.Context, ns, pod, container string, cmd ...string) (string, string, error) {
	p, err := c.Kube.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return "", "", err
	}
	id := ""
	for _, st := range p.Status.ContainerStatuses {
		if st.Name == container {
			id = strings.TrimPrefix(st.ContainerID, "containerd://")
		}
	}
	if id == "" {
		return "", "", fmt.Errorf("pod %s/%s has no running container %s", ns, pod, container)
	}
	execID := fmt.Sprintf("exec-%d", time.Now().UnixNano())
	args := append([]string{"--address", c.ContainerdSock, "-n", "k8s.io", "tasks", "exec", "--exec-id", execID, id}, cmd...)
	var out, errb bytes.Buffer
	x := exec.CommandContext(ctx, c.Bin["ctr"], args...)
	x.Stdout, x.Stderr = &out, &errb
	err = x.Run()
	return out.String(), errb.String(), err
}

// Helm runs helm against the cluster.
func (c *Cluster) Helm(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.Bin["helm"], args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.Kubeconfig, "HELM_CACHE_HOME="+c.State+"/helm/cache",
		"HELM_CONFIG_HOME="+c.State+"/helm/config", "HELM_DATA_HOME="+c.State+"/helm/data")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// PodNetns returns /proc/<pid>/ns/net of a pod's container's first process
// (from containerd's task list).
func (c *Cluster) PodNetns(ctx context.Context, ns, pod, container string) (string, error) {
	p, err := c.Kube.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	id := ""
	for _, st := range p.Status.ContainerStatuses {
		if st.Name == container {
			id = strings.TrimPrefix(st.ContainerID, "containerd://")
		}
	}
	if id == "" {
		return "", fmt.Errorf("pod %s/%s: no container %s", ns, pod, container)
	}
	out, err := exec.CommandContext(ctx, c.Bin["ctr"], "--address", c.ContainerdSock, "-n", "k8s.io", "tasks", "ls").Output()
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			return "/proc/" + f[1] + "/ns/net", nil
		}
	}
	return "", fmt.Errorf("pod %s/%s: no task for container %s", ns, pod, id)
}
