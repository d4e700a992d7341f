// Package kubetest starts a real Kubernetes API server (kube-apiserver and
// etcd through controller-runtime's envtest) for tests, with Istio's
// security.istio.io CRDs installed. The binaries are built by
// hack/build-envtest.sh (make tools) into the tools cache; without them a
// test skips, or fails when WARREN_REQUIRE_PRIVILEGED=1 (CI).
package kubetest

import (
	_ "embed"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/warren-mesh/warren/internal/testenv"
)

// KubeVersion is the Kubernetes version hack/build-envtest.sh builds.
const KubeVersion = "1.36.3"

// MakeTarget builds the binaries.
const MakeTarget = "make tools (hack/build-envtest.sh)"

//go:embed istio-security-crds.yaml
var istioCRDs []byte

// Assets returns the directory holding kube-apiserver and etcd: the
// KUBEBUILDER_ASSETS variable if set, else the tools cache. It skips (or
// fails in CI) when they are missing.
func Assets(tb testing.TB) string {
	tb.Helper()
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		cache := os.Getenv("WARREN_TOOLS_CACHE")
		if cache == "" {
			home, _ := os.UserHomeDir()
			cache = filepath.Join(home, ".cache", "warren", "tools")
		}
		dir = filepath.Join(cache, "envtest-v"+KubeVersion)
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			testenv.SkipOrFail(tb, "kube-apiserver and etcd not found in %s: run %s", dir, MakeTarget)
		}
	}
	return dir
}

// Env is a running API server.
type Env struct {
	// Config is an admin's client configuration.
	Config *rest.Config
	// Kube and Istio are admin clients.
	Kube  kubernetes.Interface
	Istio istioclient.Interface
	env   *envtest.Environment
}

// Config changes the API server's defaults.
type Config struct {
	// ServiceCIDR is the range of Services' cluster IPs; "" means envtest's
	// 10.0.0.0/24. Tests that send traffic to a VIP use 198.18.200.0/24.
	ServiceCIDR string
}

// Start runs an API server with Istio's security CRDs for the test's
// duration (a few seconds to start).
func Start(tb testing.TB) *Env {
	tb.Helper()
	return StartWith(tb, Config{})
}

// StartWith is Start with a Config.
func StartWith(tb testing.TB, c Config) *Env {
	tb.Helper()
	assets := Assets(tb)
	crds, err := CRDs()
	if err != nil {
		tb.Fatal(err)
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDInstallOptions:     envtest.CRDInstallOptions{CRDs: crds},
	}
	// Explicit paths: an empty KUBEBUILDER_ASSETS must not send envtest to $PATH.
	env.ControlPlane.GetAPIServer().Path = filepath.Join(assets, "kube-apiserver")
	env.ControlPlane.Etcd = &envtest.Etcd{Path: filepath.Join(assets, "etcd")}
	if c.ServiceCIDR != "" {
		env.ControlPlane.GetAPIServer().Configure().Set("service-cluster-ip-range", c.ServiceCIDR)
	}
	cfg, err := env.Start()
	if err != nil {
		tb.Fatalf("start envtest (kube-apiserver, etcd from %s): %v", assets, err)
	}
	tb.Cleanup(func() {
		if err := env.Stop(); err != nil {
			tb.Errorf("stop envtest: %v", err)
		}
	})
	e := &Env{Config: cfg, env: env}
	if e.Kube, err = kubernetes.NewForConfig(cfg); err != nil {
		tb.Fatal(err)
	}
	if e.Istio, err = istioclient.NewForConfig(cfg); err != nil {
		tb.Fatal(err)
	}
	return e
}

// Kubeconfig writes a kubeconfig file for a user with the given groups
// (nil: system:masters, an admin) into dir and returns its path.
func (e *Env) Kubeconfig(tb testing.TB, dir, user string, groups []string) string {
	tb.Helper()
	if groups == nil {
		groups = []string{"system:masters"}
	}
	u, err := e.env.AddUser(envtest.User{Name: user, Groups: groups}, nil)
	if err != nil {
		tb.Fatalf("add envtest user %s: %v", user, err)
	}
	b, err := u.KubeConfig()
	if err != nil {
		tb.Fatalf("kubeconfig of %s: %v", user, err)
	}
	path := filepath.Join(dir, strings.NewReplacer(":", "_", "/", "_").Replace(user)+".kubeconfig")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		tb.Fatal(err)
	}
	return path
}

// UserConfig returns a client configuration for a user with the given groups.
func (e *Env) UserConfig(tb testing.TB, user string, groups []string) *rest.Config {
	tb.Helper()
	u, err := e.env.AddUser(envtest.User{Name: user, Groups: groups}, nil)
	if err != nil {
		tb.Fatalf("add envtest user %s: %v", user, err)
	}
	return u.Config()
}

// CRDs returns Istio's AuthorizationPolicy and PeerAuthentication CRDs
// (copied from istio.io/api v1.31.1).
func CRDs() ([]*apiextensionsv1.CustomResourceDefinition, error) {
	var out []*apiextensionsv1.CustomResourceDefinition
	for _, doc := range strings.Split(string(istioCRDs), "\n---\n") {
		if strings.TrimSpace(doc) == "" || !strings.Contains(doc, "kind: CustomResourceDefinition") {
			continue
		}
		crd := &apiextensionsv1.CustomResourceDefinition{}
		if err := yaml.Unmarshal([]byte(doc), crd); err != nil {
			return nil, fmt.Errorf("parse Istio CRDs: %w", err)
		}
		out = append(out, crd)
	}
	if len(out) != 2 {
		return nil, fmt.Errorf("parse Istio CRDs: found %d, want 2", len(out))
	}
	return out, nil
}

// ServiceAccountSigner returns the API server's --service-account-issuer and
// the path of its --service-account-signing-key-file (envtest's RSA key), so
// a test can mint a token the API server will judge on its merits, e.g. one
// that has expired (TokenRequest refuses lifetimes under 10 minutes).
// TokenRequest and TokenReview need nothing more: envtest sets the issuer
// and key files, and --api-audiences defaults to the issuer.
func (e *Env) ServiceAccountSigner() (issuer, keyFile string) {
	s := e.env.ControlPlane.GetAPIServer()
	return s.SecureServing.URL("https", "/").String(), filepath.Join(s.CertDir, "sa-signer.key")
}
