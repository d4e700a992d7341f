package main

import (
	"context"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/warren-mesh/warren/pkg/caserver"
	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
)

// startWarrenCA runs pkg/caserver on loopback behind a fake API server that
// knows one token, goodToken, of the node agent's ServiceAccount bound to a
// pod on node1, where pod "web" (ServiceAccount default/web) runs. It
// returns the --ca-provider=warren flags that send token.
func startWarrenCA(t *testing.T, goodToken, token string, opts ...func(*caserver.Options)) []string {
	t.Helper()
	dir := t.TempDir()
	td := spiffeid.RequireTrustDomainFromString(testTD)
	certPEM, keyPEM, err := builtinca.GenerateRoot(builtinca.Options{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: certPEM, builtinca.KeyFile: keyPEM}, builtinca.Options{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	kube := fake.NewClientset([]runtime.Object{
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "warren-system", Name: "agent-1", UID: "uid-1"},
			Spec: corev1.PodSpec{ServiceAccountName: "warren-nodeagent", NodeName: "node1"}},
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web", UID: "uid-web"},
			Spec: corev1.PodSpec{ServiceAccountName: "web", NodeName: "node1"}},
	}...)
	kube.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		if tr.Spec.Token != goodToken {
			tr.Status.Error = "invalid bearer token"
			return true, tr, nil
		}
		tr.Status = authnv1.TokenReviewStatus{Authenticated: true, Audiences: tr.Spec.Audiences, User: authnv1.UserInfo{
			Username: "system:serviceaccount:warren-system:warren-nodeagent",
			Extra:    map[string]authnv1.ExtraValue{caserver.ExtraPodName: {"agent-1"}, caserver.ExtraPodUID: {"uid-1"}}}}
		return true, tr, nil
	})
	pods, err := caserver.NewPodIndex(kube, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	pods.Start(ctx)
	pods.WaitForSync(ctx)
	o := caserver.Options{CA: ca, Kube: kube, Pods: pods,
		NodeAgents: []types.NamespacedName{{Namespace: "warren-system", Name: "warren-nodeagent"}}}
	for _, f := range opts {
		f(&o)
	}
	srv, err := caserver.New(o)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := caserver.NewServingCert(ca, []string{"127.0.0.1"}, nil, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(sc.TLSConfig())))
	pb.RegisterIstioCertificateServiceServer(gs, srv)
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)

	// The agent gets the root certificate only, never the key.
	root := filepath.Join(dir, "root-cert.pem")
	if err := os.WriteFile(root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Bundle().X509Authorities()[0].Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--ca-provider=warren", "--ca-addr", ln.Addr().String(), "--ca-root-cert", root, "--ca-token-file", tokenFile}
}

// TestWarrenCARotates: with --ca-provider=warren the Manager renews each
// certificate at half-life from the CA service, with no restart. A 62 s
// certificate, backdated a minute by the CA, is due for renewal a second
// after issue.
func TestWarrenCARotates(t *testing.T) {
	web := mustIdentity(t, "default", "web")
	s := startStack(t, startWarrenCA(t, "token-1", "token-1", func(o *caserver.Options) { o.MaxTTL = 62 * time.Second }),
		func(identity.Identity) bool { return true })
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := s.certs.Acquire(ctx, web); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline) && len(seen) < 3; time.Sleep(100 * time.Millisecond) {
		ci := s.certs.Certificates()[0]
		if ci.State == identity.StateValid {
			seen[ci.Serial] = true
		}
	}
	if len(seen) < 3 {
		t.Fatalf("saw serials %v in 15 s, want at least 3 (renewal every ~1 s)", seen)
	}
	if err := s.certs.Ready(); err != nil {
		t.Errorf("Ready after rotations: %v", err)
	}
}
