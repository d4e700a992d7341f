// Package chart tests the Helm chart in charts/warren: helm lint, rendering
// with default and non-default values against golden files, server-side
// validation of every rendered object by a real kube-apiserver (dry run with
// strict field validation), and the chart's RBAC being enough, and no more,
// for the Kubernetes provider. helm is built by hack/build-helm.sh and the
// API server by hack/build-envtest.sh (make tools).
package chart

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/warren-mesh/warren/internal/testenv"
	"github.com/warren-mesh/warren/pkg/caserver"
	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/kube"
	"github.com/warren-mesh/warren/pkg/config/kube/kubetest"
	"github.com/warren-mesh/warren/pkg/config/store"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

const (
	helmVersion = "3.22.0"
	chartDir    = "../../charts/warren"
	namespace   = "warren-system"
	release     = "warren"
)

// valueSets are the renderings under test: the defaults, every option
// changed, and the values that replace ztunnel under istiod (README:
// Replacing ztunnel).
var valueSets = []struct{ name, values string }{
	{"default", ""},
	{"nondefault", "testdata/nondefault-values.yaml"},
	{"istiod", istiodValues},
}

const istiodValues = "testdata/istiod-values.yaml"

func helmPath(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("WARREN_TOOLS_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "warren", "tools")
	}
	p := filepath.Join(cache, "helm-v"+helmVersion, "helm")
	if _, err := os.Stat(p); err != nil {
		testenv.SkipOrFail(t, "helm v%s not found at %s: run make tools (hack/build-helm.sh)", helmVersion, p)
	}
	return p
}

func helm(t *testing.T, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(helmPath(t), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return out
}

func render(t *testing.T, values string) []byte {
	t.Helper()
	args := []string{"template", release, chartDir, "--namespace", namespace, "--kube-version", kubetest.KubeVersion}
	if values != "" {
		args = append(args, "-f", values)
	}
	return helm(t, args...)
}

// generated matches the chart-generated CA material, which differs per
// render: the Secret's lines, and the root certificate in the ConfigMap.
var (
	generated     = regexp.MustCompile(`(?m)^(  ca-(?:cert|key)\.pem: ).+$`)
	generatedRoot = regexp.MustCompile(`(?m)^(  root-cert\.pem: \|\n)(?:    .+\n)+`)
)

func TestLint(t *testing.T) {
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			args := []string{"lint", "--strict", "--kube-version", kubetest.KubeVersion, chartDir}
			if vs.values != "" {
				args = append(args, "-f", vs.values)
			}
			out := helm(t, args...)
			if !bytes.Contains(out, []byte("0 chart(s) failed")) {
				t.Errorf("helm lint:\n%s", out)
			}
		})
	}
}

func TestGolden(t *testing.T) {
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			got := generated.ReplaceAll(render(t, vs.values), []byte("${1}<generated>"))
			got = generatedRoot.ReplaceAll(got, []byte("${1}    <generated>\n"))
			path := filepath.Join("testdata", vs.name+".golden.yaml")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (go test ./tests/chart -run TestGolden -update writes it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("rendered manifests differ from %s; review and rerun with -update:\n%s", path, diff(want, got))
			}
		})
	}
}

// diff shows the first differing lines.
func diff(a, b []byte) string {
	al, bl := strings.Split(string(a), "\n"), strings.Split(string(b), "\n")
	for i := 0; i < max(len(al), len(bl)); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return fmt.Sprintf("line %d:\n- %s\n+ %s", i+1, x, y)
		}
	}
	return ""
}

// objects parses a rendering into unstructured objects.
func objects(t *testing.T, b []byte) []*unstructured.Unstructured {
	t.Helper()
	var out []*unstructured.Unstructured
	for _, doc := range strings.Split(string(b), "\n---\n") {
		m := map[string]any{}
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			t.Fatalf("parse rendered manifest: %v\n%s", err, doc)
		}
		if len(m) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
	return out
}

func find[T any](t *testing.T, objs []*unstructured.Unstructured, kind string) (*T, bool) {
	t.Helper()
	return findNamed[T](t, objs, kind, "")
}

// findNamed is find for the object of that kind and name ("" for any).
func findNamed[T any](t *testing.T, objs []*unstructured.Unstructured, kind, name string) (*T, bool) {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && (name == "" || o.GetName() == name) {
			v := new(T)
			b, _ := o.MarshalJSON()
			if err := yaml.Unmarshal(b, v); err != nil {
				t.Fatal(err)
			}
			return v, true
		}
	}
	return nil, false
}

// TestRendered checks what matters for safety beyond the golden text.
func TestRendered(t *testing.T) {
	agent := agentHelp(t)
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			objs := objects(t, render(t, vs.values))
			ds, ok := find[appsv1.DaemonSet](t, objs, "DaemonSet")
			if !ok {
				t.Fatal("no DaemonSet")
			}
			spec := ds.Spec.Template.Spec
			if !spec.HostNetwork || !spec.HostPID {
				t.Errorf("hostNetwork %v hostPID %v, want both", spec.HostNetwork, spec.HostPID)
			}
			c := spec.Containers[0]
			sc := c.SecurityContext
			if sc.Privileged == nil || *sc.Privileged || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				t.Errorf("agent security context %+v: want unprivileged, all capabilities dropped", sc)
			}
			if got := sc.Capabilities.Add; !slices.Equal(got, []corev1.Capability{"SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"}) {
				t.Errorf("agent capabilities %v", got)
			}
			if spec.TerminationGracePeriodSeconds == nil || spec.PriorityClassName == "" || c.Resources.Requests.Memory().IsZero() {
				t.Errorf("grace period, priority class or resources missing")
			}
			// Every host path the agent needs, with propagation from the host.
			mounts := map[string]corev1.VolumeMount{}
			for _, m := range c.VolumeMounts {
				mounts[m.MountPath] = m
			}
			for _, p := range []string{"/sys/fs/bpf", "/var/run/netns"} {
				if m, ok := mounts[p]; !ok || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer {
					t.Errorf("mount %s missing or without HostToContainer propagation", p)
				}
			}
			// Every WARREN_* setting names a real flag of nodeagent run.
			cm, _ := findNamed[corev1.ConfigMap](t, objs, "ConfigMap", release)
			if cm.Data["WARREN_CA_PROVIDER"] == "warren" {
				if m, ok := mounts["/var/run/secrets/warren/root"]; !ok || !m.ReadOnly {
					t.Errorf("CA root ConfigMap not mounted read-only at /var/run/secrets/warren/root")
				}
			}
			for k := range cm.Data {
				if !strings.Contains(agent, "["+k+"]") {
					t.Errorf("ConfigMap sets %s, which no nodeagent run flag reads", k)
				}
			}
			for _, e := range c.Env {
				if !strings.Contains(agent, "["+e.Name+"]") {
					t.Errorf("env %s is no nodeagent run flag", e.Name)
				}
			}
			// Unset by default: the agent finds or mounts the host's cgroup2 root itself.
			if root, ok := cm.Data["WARREN_CGROUP_ROOT"]; ok && mounts[root].Name == "" {
				t.Errorf("WARREN_CGROUP_ROOT %s is not mounted", root)
			}
			// RBAC: read-only except pod annotation; never Secrets.
			cr, _ := findNamed[rbacv1.ClusterRole](t, objs, "ClusterRole", release)
			// Both providers annotate pods when WARREN_ANNOTATE_PODS is true.
			annotate := cm.Data["WARREN_ANNOTATE_PODS"] == "true"
			patches := false
			for _, r := range cr.Rules {
				for _, v := range r.Verbs {
					write := !slices.Contains([]string{"get", "list", "watch"}, v)
					podPatch := v == "patch" && slices.Equal(r.Resources, []string{"pods"})
					patches = patches || podPatch
					if write && !(annotate && podPatch) {
						t.Errorf("ClusterRole grants %s on %v", v, r.Resources)
					}
				}
				if slices.Contains(r.Resources, "secrets") || slices.Contains(r.Resources, "*") {
					t.Errorf("ClusterRole grants %v", r.Resources)
				}
			}
			if annotate && !patches {
				t.Errorf("WARREN_ANNOTATE_PODS=true but the ClusterRole cannot patch pods")
			}
			// Both providers watch namespaces (enrollment label).
			var nsVerbs []string
			for _, r := range cr.Rules {
				if slices.Contains(r.Resources, "namespaces") {
					nsVerbs = append(nsVerbs, r.Verbs...)
				}
			}
			if !slices.Contains(nsVerbs, "list") || !slices.Contains(nsVerbs, "watch") {
				t.Errorf("ClusterRole grants %v on namespaces, want list and watch", nsVerbs)
			}
			// The Role: reading the agents' own DaemonSet (uninstall detection), nothing else.
			role, ok := findNamed[rbacv1.Role](t, objs, "Role", "")
			if !ok {
				t.Errorf("no Role for the agents' DaemonSet")
			} else {
				for _, r := range role.Rules {
					if !slices.Equal(r.Resources, []string{"daemonsets"}) || !slices.Equal(r.ResourceNames, []string{ds.Name}) {
						t.Errorf("Role grants %v %v, want only the DaemonSet %s", r.Resources, r.ResourceNames, ds.Name)
					}
					for _, v := range r.Verbs {
						if !slices.Contains([]string{"get", "list", "watch"}, v) {
							t.Errorf("Role grants %s on %v", v, r.Resources)
						}
					}
				}
			}
			// The agent knows its own pod (uninstall detection).
			env := map[string]string{}
			for _, e := range c.Env {
				if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
					env[e.Name] = e.ValueFrom.FieldRef.FieldPath
				}
			}
			if env["WARREN_POD_NAME"] != "metadata.name" || env["WARREN_POD_NAMESPACE"] != "metadata.namespace" {
				t.Errorf("agent env from the downward API %v: want WARREN_POD_NAME and WARREN_POD_NAMESPACE", env)
			}
		})
	}
}

// agentHelp returns nodeagent run --help, which lists each flag's variable.
func agentHelp(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(buildAgent(t), "run", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("nodeagent run --help: %v\n%s", err, out)
	}
	return string(out)
}

// buildAgent builds cmd/nodeagent into the test's temporary directory.
func buildAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nodeagent")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/nodeagent").CombinedOutput(); err != nil {
		t.Fatalf("build nodeagent: %v\n%s", err, out)
	}
	return bin
}

// TestIstiodValues: the values that replace ztunnel render what ztunnel's own
// chart gives ztunnel (Istio manifests/charts/ztunnel templates/daemonset.yaml:
// XDS_ADDRESS and CA_ADDRESS, POD_NAME, POD_NAMESPACE and INSTANCE_IP from the
// downward API, the istio-ca-root-cert ConfigMap at /var/run/secrets/istio,
// a projected token with audience istio-ca at /var/run/secrets/tokens),
// with the agent's settings pointing at those files; and provider=istiod
// without ca.provider=istiod is refused.
func TestIstiodValues(t *testing.T) {
	objs := objects(t, render(t, istiodValues))
	ds, ok := find[appsv1.DaemonSet](t, objs, "DaemonSet")
	if !ok {
		t.Fatal("no DaemonSet")
	}
	cm, _ := findNamed[corev1.ConfigMap](t, objs, "ConfigMap", release)
	for k, want := range map[string]string{
		"WARREN_PROVIDER":     "istiod",
		"WARREN_CA_PROVIDER":  "istiod",
		"WARREN_XDS_ADDRESS":  "istiod-canary.istio-system.svc:15012",
		"WARREN_ISTIOD_ADDR":  "istiod-canary.istio-system.svc:15012",
		"WARREN_CLUSTER_ID":   "cluster-east",
		"WARREN_TRUST_DOMAIN": "east.example.org",
	} {
		if got := cm.Data[k]; got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	// The agent writes the redirection annotation istiod reads (annotatePods).
	if got := cm.Data["WARREN_ANNOTATE_PODS"]; got != "true" {
		t.Errorf("WARREN_ANNOTATE_PODS = %q with provider=istiod, want \"true\": istiod marks a pod HBONE only once it is annotated", got)
	}
	// The Kubernetes provider's other settings mean nothing under istiod.
	for _, k := range []string{"WARREN_ENROLL_LABEL", "WARREN_ROOT_NAMESPACE", "WARREN_CLUSTER_DOMAIN"} {
		if v, ok := cm.Data[k]; ok {
			t.Errorf("%s=%q rendered with provider=istiod", k, v)
		}
	}
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	fieldEnv := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			fieldEnv[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	for k, want := range map[string]string{"WARREN_POD_NAME": "metadata.name", "WARREN_POD_NAMESPACE": "metadata.namespace", "WARREN_INSTANCE_IPS": "status.podIP", "WARREN_NODE": "spec.nodeName"} {
		if fieldEnv[k] != want {
			t.Errorf("env %s from %q, want the downward API's %s", k, fieldEnv[k], want)
		}
	}
	// The files the settings name are the mounted root ConfigMap and token.
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	mountedFile := func(file string) (corev1.VolumeMount, string, bool) {
		for _, m := range c.VolumeMounts {
			if filepath.Dir(file) == m.MountPath {
				return m, filepath.Base(file), true
			}
		}
		return corev1.VolumeMount{}, "", false
	}
	m, key, ok := mountedFile(cm.Data["WARREN_ISTIOD_ROOT_CA"])
	if v := volumes[m.Name]; !ok || !m.ReadOnly || v.ConfigMap == nil || v.ConfigMap.Name != "istio-ca-root-cert" || key != "root-cert.pem" {
		t.Errorf("WARREN_ISTIOD_ROOT_CA %s: want root-cert.pem of ConfigMap istio-ca-root-cert mounted read-only (mount %+v, volume %+v)", cm.Data["WARREN_ISTIOD_ROOT_CA"], m, v)
	}
	m, key, ok = mountedFile(cm.Data["WARREN_ISTIOD_TOKEN_FILE"])
	v := volumes[m.Name]
	if !ok || !m.ReadOnly || v.Projected == nil || len(v.Projected.Sources) != 1 || v.Projected.Sources[0].ServiceAccountToken == nil {
		t.Fatalf("WARREN_ISTIOD_TOKEN_FILE %s: want a projected ServiceAccount token mounted read-only (mount %+v, volume %+v)", cm.Data["WARREN_ISTIOD_TOKEN_FILE"], m, v)
	}
	if tok := v.Projected.Sources[0].ServiceAccountToken; tok.Path != key || tok.Audience != "istio-ca" || tok.ExpirationSeconds == nil || *tok.ExpirationSeconds != 43200 {
		t.Errorf("token %+v: want path %s, audience istio-ca, 43200 s as ztunnel's", tok, key)
	}
	// The identity istiod must trust (CA_TRUSTED_NODE_ACCOUNTS) is the rendered ServiceAccount.
	sa, ok := find[corev1.ServiceAccount](t, objs, "ServiceAccount")
	if !ok || spec.ServiceAccountName != sa.Name || sa.Namespace != namespace || sa.Name != release {
		t.Errorf("DaemonSet runs as %q, ServiceAccount %+v: want %s/%s, the account the README has istiod trust", spec.ServiceAccountName, sa, namespace, release)
	}

	t.Run("needs ca.provider=istiod", func(t *testing.T) {
		templateFails(t, "provider=istiod", "provider=istiod needs ca.provider=istiod")
	})
}

// TestAgentAcceptsRenderedSettings runs the agent binary with each rendered
// DaemonSet's command, arguments and environment (the ConfigMap, and sample
// values for the downward API) on this host: it must get past parsing and
// checking every setting and stop only where a real node would differ (no
// in-cluster API server for the Kubernetes provider, no istiod root file
// for istiod's), so chart and flags cannot drift apart.
func TestAgentAcceptsRenderedSettings(t *testing.T) {
	bin := buildAgent(t)
	downward := map[string]string{"spec.nodeName": "node-1", "metadata.name": "warren-abcde", "metadata.namespace": namespace, "status.podIP": "198.18.0.10"}
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			objs := objects(t, render(t, vs.values))
			ds, _ := find[appsv1.DaemonSet](t, objs, "DaemonSet")
			cm, _ := findNamed[corev1.ConfigMap](t, objs, "ConfigMap", release)
			c := ds.Spec.Template.Spec.Containers[0]
			env := []string{"PATH=" + os.Getenv("PATH")}
			for k, v := range cm.Data {
				env = append(env, k+"="+v)
			}
			for _, e := range c.Env {
				switch {
				case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil:
					v, ok := downward[e.ValueFrom.FieldRef.FieldPath]
					if !ok {
						t.Fatalf("env %s from %s: no sample value", e.Name, e.ValueFrom.FieldRef.FieldPath)
					}
					env = append(env, e.Name+"="+v)
				case e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil:
					// What the kubelet gives: the container's limit in units
					// of the divisor (the node's allocatable memory when the
					// container has no limit, here 24 GiB).
					rf := e.ValueFrom.ResourceFieldRef
					name, ok := strings.CutPrefix(rf.Resource, "limits.")
					if !ok || rf.ContainerName != c.Name {
						t.Fatalf("env %s: resource field %s of container %q, want a limit of %q", e.Name, rf.Resource, rf.ContainerName, c.Name)
					}
					v := resource.MustParse("24Gi")
					if q, ok := c.Resources.Limits[corev1.ResourceName(name)]; ok {
						v = q
					}
					div := int64(1)
					if !rf.Divisor.IsZero() {
						div = rf.Divisor.Value()
					}
					env = append(env, fmt.Sprintf("%s=%d", e.Name, v.Value()/div))
				case e.ValueFrom == nil:
					env = append(env, e.Name+"="+e.Value)
				default:
					t.Fatalf("env %s: unsupported source %+v", e.Name, e.ValueFrom)
				}
			}
			if len(c.Command) != 1 || len(c.Args) == 0 || c.Args[0] != "run" {
				t.Fatalf("agent command %v args %v: want the binary and run", c.Command, c.Args)
			}
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, c.Args...)
			cmd.Env = env
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("agent ran to completion on the test host:\n%s", out)
			}
			want := map[string]string{
				"kubernetes": "kubernetes client configuration",
				"istiod":     "--provider=istiod: --istiod-root-ca",
			}[cm.Data["WARREN_PROVIDER"]]
			if want == "" || !strings.Contains(string(out), want) {
				t.Errorf("agent with the rendered settings: %v\n%s\nwant it to stop at %q (after every setting was accepted)", err, out, want)
			}
		})
	}
}

// TestCASecret: the chart-generated root is one the CA service accepts, the
// agents' ConfigMap holds its certificate (and no key), and only the CA
// service mounts the Secret.
func TestCASecret(t *testing.T) {
	objs := objects(t, render(t, ""))
	s, ok := find[corev1.Secret](t, objs, "Secret")
	if !ok {
		t.Fatal("no CA Secret")
	}
	if s.Annotations["helm.sh/resource-policy"] != "keep" {
		t.Errorf("CA Secret would be deleted by helm uninstall")
	}
	_, err := builtinca.New(s.Data, builtinca.Options{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")})
	if err != nil {
		t.Fatalf("the CA rejects the chart's Secret: %v", err)
	}
	root, ok := findNamed[corev1.ConfigMap](t, objs, "ConfigMap", release+"-ca-root")
	if !ok {
		t.Fatal("no root ConfigMap")
	}
	if got, want := strings.TrimSpace(root.Data["root-cert.pem"]), strings.TrimSpace(string(s.Data["ca-cert.pem"])); got != want {
		t.Errorf("root ConfigMap holds\n%s\nwant the Secret's ca-cert.pem\n%s", got, want)
	}
	if len(root.Data) != 1 || strings.Contains(root.Data["root-cert.pem"], "PRIVATE KEY") {
		t.Errorf("root ConfigMap holds %v: want root-cert.pem only, no key", slices.Collect(maps.Keys(root.Data)))
	}
	dep, ok := find[appsv1.Deployment](t, objs, "Deployment")
	if !ok {
		t.Fatal("no CA service Deployment")
	}
	if v := dep.Spec.Template.Spec.Volumes; len(v) != 1 || v[0].Secret == nil || v[0].Secret.SecretName != s.Name {
		t.Errorf("CA service volumes %+v: want the CA Secret %s only", v, s.Name)
	}
	if args := strings.Join(dep.Spec.Template.Spec.Containers[0].Args, " "); !strings.HasPrefix(args, "ca serve ") ||
		!strings.Contains(args, "--node-agent-sa="+namespace+"/"+release) || !strings.Contains(args, "--serving-names="+release+"-ca."+namespace+".svc,") {
		t.Errorf("CA service args %q", args)
	}
	// With ca.existingSecret the chart creates none and publishes ca.rootCert.
	objs = objects(t, render(t, valueSets[1].values))
	if _, ok := find[corev1.Secret](t, objs, "Secret"); ok {
		t.Errorf("a Secret is rendered although ca.existingSecret is set")
	}
	if root, ok := findNamed[corev1.ConfigMap](t, objs, "ConfigMap", release+"-ca-root"); !ok || !strings.Contains(root.Data["root-cert.pem"], "BEGIN CERTIFICATE") {
		t.Errorf("no root ConfigMap from ca.rootCert")
	}
}

// TestNoCAKeyInDaemonSet renders every ca.provider value (and a CA from an
// existing Secret) and fails if any DaemonSet volume could hold a CA
// private key: a Secret volume, a projected Secret, or any volume whose items
// name a key file. builtin, which would need one, must be refused.
func TestNoCAKeyInDaemonSet(t *testing.T) {
	for _, tt := range []struct{ name, provider, values string }{
		{"warren", "warren", ""},
		{"warren with an existing Secret", "warren", valueSets[1].values},
		{"spire", "spire", ""},
		{"istiod", "istiod", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := []string{"template", release, chartDir, "--namespace", namespace, "--kube-version", kubetest.KubeVersion, "--set", "ca.provider=" + tt.provider}
			if tt.values != "" {
				args = append(args, "-f", tt.values)
			}
			objs := objects(t, helm(t, args...))
			ds, ok := find[appsv1.DaemonSet](t, objs, "DaemonSet")
			if !ok {
				t.Fatal("no DaemonSet")
			}
			cm, _ := findNamed[corev1.ConfigMap](t, objs, "ConfigMap", release)
			if got := cm.Data["WARREN_CA_PROVIDER"]; got != tt.provider {
				t.Errorf("WARREN_CA_PROVIDER = %q, want %q", got, tt.provider)
			}
			for _, v := range ds.Spec.Template.Spec.Volumes {
				if v.Secret != nil {
					t.Errorf("DaemonSet volume %s is Secret %s: the node agents must hold no CA key", v.Name, v.Secret.SecretName)
				}
				if v.Projected != nil {
					for _, src := range v.Projected.Sources {
						if src.Secret != nil {
							t.Errorf("DaemonSet volume %s projects Secret %s", v.Name, src.Secret.Name)
						}
					}
				}
				if v.ConfigMap != nil {
					for _, it := range v.ConfigMap.Items {
						if strings.Contains(it.Key, "key") {
							t.Errorf("DaemonSet volume %s maps %s", v.Name, it.Key)
						}
					}
				}
				if v.HostPath != nil && strings.Contains(v.HostPath.Path, "/ca") {
					t.Errorf("DaemonSet volume %s mounts host path %s", v.Name, v.HostPath.Path)
				}
			}
			// A ConfigMap the DaemonSet mounts must not carry a key either.
			for _, o := range objs {
				if o.GetKind() == "ConfigMap" && strings.Contains(fmt.Sprint(o.Object["data"]), "PRIVATE KEY") {
					t.Errorf("ConfigMap %s holds a private key", o.GetName())
				}
			}
		})
	}
	t.Run("builtin is refused", func(t *testing.T) {
		templateFails(t, "ca.provider=builtin", "would mount the mesh's CA private key into every node agent")
	})
}

// templateFails checks that helm template with --set set fails saying want.
func templateFails(t *testing.T, set, want string) {
	t.Helper()
	cmd := exec.Command(helmPath(t), "template", release, chartDir, "--namespace", namespace, "--kube-version", kubetest.KubeVersion, "--set", set)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), want) {
		t.Errorf("helm template --set %s: %v, want a failure saying %q\n%s", set, err, want, out)
	}
}

// TestServerDryRun sends every rendered object to a real kube-apiserver with
// dryRun=All and strict field validation: schema errors and unknown fields fail.
func TestServerDryRun(t *testing.T) {
	env := kubetest.Start(t)
	if _, err := envtest.InstallCRDs(env.Config, envtest.CRDInstallOptions{Paths: []string{"testdata/crds"}, ErrorIfPathMissing: true}); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := env.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(env.Kube.Discovery()))
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			kinds := map[string]bool{}
			for _, o := range objects(t, render(t, vs.values)) {
				gvk := o.GroupVersionKind()
				m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
				if err != nil {
					t.Fatalf("%s: %v", gvk, err)
				}
				var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
				if m.Scope.Name() == meta.RESTScopeNameNamespace {
					ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
				}
				if _, err := ri.Create(ctx, o, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"}); err != nil {
					t.Errorf("%s %s: %v", gvk.Kind, o.GetName(), err)
				}
				kinds[gvk.Kind] = true
			}
			want := []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "DaemonSet"}
			switch vs.name {
			case "nondefault":
				want = append(want, "Service", "ServiceMonitor")
			case "default":
				want = append(want, "Secret")
			}
			for _, k := range want {
				if !kinds[k] {
					t.Errorf("no %s rendered", k)
				}
			}
		})
	}
}

// startWithChartRBAC starts an API server with the chart's ServiceAccount
// and RBAC rendered from values, the agent's namespace and an enrolled
// namespace "app" holding a running pod "web" on node-1, and returns the
// ServiceAccount's credentials, as the kubelet would mount them.
func startWithChartRBAC(t *testing.T, values string) (*kubetest.Env, *rest.Config) {
	t.Helper()
	env := kubetest.Start(t)
	ctx := t.Context()
	for _, ns := range []string{namespace, "app"} {
		labels := map[string]string{}
		if ns == "app" {
			labels[kube.DefaultEnrollLabel] = kube.DefaultEnrollValue
		}
		if _, err := env.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: labels}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	sa := applyRBAC(t, env, values)
	pod, err := env.Kube.CoreV1().Pods("app").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "web", Image: "web"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "198.19.1.10", PodIPs: []corev1.PodIP{{IP: "198.19.1.10"}}}
	if _, err := env.Kube.CoreV1().Pods("app").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return env, env.UserConfig(t, "system:serviceaccount:"+namespace+":"+sa,
		[]string{"system:serviceaccounts", "system:serviceaccounts:" + namespace, "system:authenticated"})
}

// TestRBACIsEnough applies the chart's ServiceAccount and RBAC, then runs the
// Kubernetes provider as that service account: it must see and enroll a pod
// and annotate it, and must not read Secrets or delete pods.
func TestRBACIsEnough(t *testing.T) {
	env, cfg := startWithChartRBAC(t, "")
	ctx := t.Context()
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ic, err := istioclient.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	st := store.New("node-1")
	p, err := kube.New(kc, ic, st, kube.Options{
		Node: "node-1",
		Resolver: resolverFunc(func(uids []string) (map[string]kube.Netns, error) {
			return map[string]kube.Netns{uids[0]: {Path: "/run/netns/web"}}, nil
		}),
		Config: config.Options{CheckNetns: func(string) error { return nil }},
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- p.Run(runCtx) }()
	defer func() { cancel(); <-done }()

	deadline := time.Now().Add(15 * time.Second)
	for {
		got, err := env.Kube.CoreV1().Pods("app").Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Current().EnrolledWorkloads()) == 1 && got.Annotations[kube.RedirectionAnnotation] == kube.RedirectionEnabled {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("as the chart's service account the provider did not enroll and annotate the pod: %+v", p.Status())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st := p.Status(); !st.IstioPolicies || st.LastError != "" {
		t.Errorf("provider status %+v: want Istio policies watched, no error", st)
	}
	// And no more than that.
	if _, err := kc.CoreV1().Secrets(namespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("listing Secrets as the agent: %v, want Forbidden", err)
	}
	if err := kc.CoreV1().Pods("app").Delete(ctx, "web", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("deleting a pod as the agent: %v, want Forbidden", err)
	}
	if _, err := kc.CoreV1().ConfigMaps(namespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("listing ConfigMaps as the agent: %v, want Forbidden", err)
	}

	// Uninstall detection (cmd/nodeagent/owner.go): the agent gets, lists and
	// watches its own DaemonSet by name, and no other.
	labels := map[string]string{"app": "agent"}
	for _, name := range []string{release, "other"} {
		ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace}, Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "a", Image: "a"}}}},
		}}
		if _, err := env.Kube.AppsV1().DaemonSets(namespace).Create(ctx, ds, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kc.AppsV1().DaemonSets(namespace).Get(ctx, release, metav1.GetOptions{}); err != nil {
		t.Errorf("getting its DaemonSet as the agent: %v", err)
	}
	byName := metav1.ListOptions{FieldSelector: "metadata.name=" + release}
	if l, err := kc.AppsV1().DaemonSets(namespace).List(ctx, byName); err != nil || len(l.Items) != 1 {
		t.Errorf("listing its DaemonSet by name as the agent: %v", err)
	}
	if w, err := kc.AppsV1().DaemonSets(namespace).Watch(ctx, byName); err != nil {
		t.Errorf("watching its DaemonSet by name as the agent: %v", err)
	} else {
		w.Stop()
	}
	if _, err := kc.AppsV1().DaemonSets(namespace).Get(ctx, "other", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("getting another DaemonSet as the agent: %v, want Forbidden", err)
	}
	if _, err := kc.AppsV1().DaemonSets(namespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("listing every DaemonSet as the agent: %v, want Forbidden", err)
	}
}

// applyRBAC creates the chart's ServiceAccounts and RBAC rendered with
// values and returns the agents' ServiceAccount name.
func applyRBAC(t *testing.T, env *kubetest.Env, values string) string {
	t.Helper()
	ctx := t.Context()
	dyn, err := dynamic.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(env.Kube.Discovery()))
	sa := ""
	for _, o := range objects(t, render(t, values)) {
		switch o.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
		default:
			continue
		}
		if o.GetKind() == "ServiceAccount" && o.GetName() == release { // the agents' (the CA service's is <release>-ca)
			sa = o.GetName()
		}
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatal(err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		if _, err := ri.Create(ctx, o, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create %s: %v", o.GetName(), err)
		}
	}
	return sa
}

// TestIstiodRBACIsEnough applies the chart's RBAC of the istiod value set and
// runs the istiod mode's pod annotator (kube.Annotator) as the agents'
// ServiceAccount: it must list and watch this node's pods and the
// namespaces and annotate a pod of an ambient namespace.
func TestIstiodRBACIsEnough(t *testing.T) {
	env, cfg := startWithChartRBAC(t, istiodValues)
	ctx := t.Context()
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a, err := kube.NewAnnotator(kc, kube.AnnotatorOptions{
		Node: "node-1",
		Resolver: resolverFunc(func(uids []string) (map[string]kube.Netns, error) {
			return map[string]kube.Netns{uids[0]: {Path: "/run/netns/web"}}, nil
		}),
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(runCtx) }()
	defer func() { cancel(); <-done }()
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		got, err := env.Kube.CoreV1().Pods("app").Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Annotations[kube.RedirectionAnnotation] == kube.RedirectionEnabled {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("as the chart's service account (istiod values) the annotator did not annotate the pod")
		}
	}
	if err := kc.CoreV1().Pods("app").Delete(ctx, "web", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("deleting a pod as the agent: %v, want Forbidden", err)
	}
}

type resolverFunc func([]string) (map[string]kube.Netns, error)

func (f resolverFunc) Resolve(uids []string) (map[string]kube.Netns, error) { return f(uids) }

// The restart guarantees need the new agent to start before the old one
// stops, a grace period longer than the hand-over plus the drain, a shared
// state directory, and no hostPorts (which would keep the surge pod Pending).
func TestRestartSettings(t *testing.T) {
	for name, values := range map[string]string{"default": "", "maxUnavailable override": "testdata/nondefault-values.yaml"} {
		t.Run(name, func(t *testing.T) {
			ds, ok := find[appsv1.DaemonSet](t, objects(t, render(t, values)), "DaemonSet")
			if !ok {
				t.Fatal("no DaemonSet")
			}
			ru := ds.Spec.UpdateStrategy.RollingUpdate
			if ru == nil || ru.MaxSurge == nil || ru.MaxUnavailable == nil {
				t.Fatalf("rolling update %+v: want maxSurge and maxUnavailable set", ru)
			}
			surge, unavail := ru.MaxSurge.String(), ru.MaxUnavailable.String()
			if values == "" && (surge != "1" || unavail != "0") {
				t.Errorf("default strategy maxSurge %s maxUnavailable %s, want 1 and 0", surge, unavail)
			}
			if (surge == "0") == (unavail == "0") {
				t.Errorf("exactly one of maxSurge (%s) and maxUnavailable (%s) must be non-zero", surge, unavail)
			}
			pod := ds.Spec.Template.Spec
			c := pod.Containers[0]
			if len(c.Ports) != 0 {
				t.Errorf("agent declares ports %v: with hostNetwork they are hostPorts and block the surge pod", c.Ports)
			}
			env := map[string]string{}
			cm, _ := findNamed[corev1.ConfigMap](t, objects(t, render(t, values)), "ConfigMap", release)
			for k, v := range cm.Data {
				env[k] = v
			}
			handover, err1 := time.ParseDuration(env["WARREN_HANDOVER_TIMEOUT"])
			drain, err2 := time.ParseDuration(env["WARREN_DRAIN_TIMEOUT"])
			if err1 != nil || err2 != nil {
				t.Fatalf("handover %q drain %q", env["WARREN_HANDOVER_TIMEOUT"], env["WARREN_DRAIN_TIMEOUT"])
			}
			if grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second; grace <= handover+drain {
				t.Errorf("grace period %v must exceed hand-over %v + drain %v", grace, handover, drain)
			}
			var holder *corev1.Container
			for i := range pod.InitContainers {
				if pod.InitContainers[i].Name == "fdstore" {
					holder = &pod.InitContainers[i]
				}
			}
			if holder == nil || holder.RestartPolicy == nil || *holder.RestartPolicy != corev1.ContainerRestartPolicyAlways {
				t.Errorf("no listener holder as a native sidecar (restartPolicy: Always): %+v", holder)
			} else if len(holder.VolumeMounts) != 1 || holder.VolumeMounts[0].MountPath != env["WARREN_STATE_DIR"] || holder.VolumeMounts[0].Name != "state" {
				t.Errorf("holder mounts %+v, want only the state dir", holder.VolumeMounts)
			}
			mounted := false
			for _, m := range c.VolumeMounts {
				if m.MountPath == env["WARREN_STATE_DIR"] {
					mounted = true
				}
			}
			if !mounted {
				t.Errorf("state dir %q is not a mounted (host) volume", env["WARREN_STATE_DIR"])
			}
		})
	}
}

// TestCARBACIsEnough applies the chart's ServiceAccounts and RBAC to a real
// API server and, with the CA service's ServiceAccount credentials, does what
// the CA service does: list and watch pods (its informer syncs) and review an
// agent's pod-bound token (TokenReview), which yields the caller and its pod.
func TestCARBACIsEnough(t *testing.T) {
	env := kubetest.Start(t)
	ctx := t.Context()
	if _, err := env.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(env.Kube.Discovery()))
	for _, o := range objects(t, render(t, "")) {
		switch o.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding":
		default:
			continue
		}
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatal(err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		if _, err := ri.Create(ctx, o, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create %s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
	// An agent pod and its projected-style token (audience istio-ca).
	agent, err := env.Kube.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "warren-node1"},
		Spec: corev1.PodSpec{NodeName: "node1", ServiceAccountName: release,
			Containers: []corev1.Container{{Name: "nodeagent", Image: "warren"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	exp := int64(600)
	tr, err := env.Kube.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, release, &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{caserver.DefaultAudience}, ExpirationSeconds: &exp,
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: agent.Name, UID: agent.UID}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	caSA := release + "-ca"
	cfg := env.UserConfig(t, "system:serviceaccount:"+namespace+":"+caSA,
		[]string{"system:serviceaccounts", "system:serviceaccounts:" + namespace, "system:authenticated"})
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := caserver.NewPodIndex(kc, 0)
	if err != nil {
		t.Fatal(err)
	}
	pods.Start(ctx)
	syncCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if !pods.WaitForSync(syncCtx) {
		t.Fatalf("as %s the pod informer did not sync: the chart's ClusterRole lacks pods list/watch", caSA)
	}
	caller, err := caserver.NewAuthenticator(kc, nil).Authenticate(ctx, tr.Status.Token)
	if err != nil {
		t.Fatalf("as %s: %v", caSA, err)
	}
	t.Logf("as %s: reviewed caller %+v", caSA, caller)
	if caller.ServiceAccount != release || caller.PodName != agent.Name || caller.PodUID != string(agent.UID) {
		t.Errorf("reviewed caller %+v, want %s/%s bound to pod %s", caller, namespace, release, agent.Name)
	}
	// And nothing more: no Secrets.
	if _, err := kc.CoreV1().Secrets(namespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the CA service may list Secrets (%v): its key is a volume, it needs no RBAC on Secrets", err)
	}
}
