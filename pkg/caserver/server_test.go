package caserver

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
	"github.com/warren-mesh/warren/pkg/identity/istioca"
)

const td = "cluster.local"

var nodeAgentSA = types.NamespacedName{Namespace: "warren-system", Name: "warren-nodeagent"}

// token is what the fake API server knows of a bearer token.
type token struct {
	ns, sa        string
	pod, uid      string
	node          string // node-name extra ("" for none)
	aud           []string
	expired       bool
	unbound       bool
	notSA         bool
	reviewFailure bool
}

// fakeKube is a fake clientset whose TokenReview reactor answers as the
// API server does: unauthenticated for an unknown, expired or
// wrong-audience token, else the ServiceAccount user with the pod extras.
type fakeKube struct {
	*fake.Clientset
	mu     sync.Mutex
	tokens map[string]token
}

func newFakeKube(pods ...*corev1.Pod) *fakeKube {
	objs := make([]runtime.Object, len(pods))
	for i, p := range pods {
		objs[i] = p
	}
	f := &fakeKube{Clientset: fake.NewClientset(objs...), tokens: map[string]token{}}
	f.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		f.mu.Lock()
		t, ok := f.tokens[tr.Spec.Token]
		f.mu.Unlock()
		switch {
		case t.reviewFailure:
			return true, nil, errors.New(`tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:warren-system:warren-ca" cannot create resource "tokenreviews"`)
		case !ok:
			tr.Status = authnv1.TokenReviewStatus{Error: "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}
		case t.expired:
			tr.Status = authnv1.TokenReviewStatus{Error: "[invalid bearer token, service account token has expired]"}
		case !slices.ContainsFunc(t.aud, func(s string) bool { return slices.Contains(tr.Spec.Audiences, s) }):
			tr.Status = authnv1.TokenReviewStatus{Error: `[invalid bearer token, token audiences ["` + strings.Join(t.aud, `","`) + `"] is invalid for the target audiences ["` + strings.Join(tr.Spec.Audiences, `","`) + `"]]`}
		default:
			u := authnv1.UserInfo{Username: "system:serviceaccount:" + t.ns + ":" + t.sa, Extra: map[string]authnv1.ExtraValue{}}
			if t.notSA {
				u.Username = "alice"
			}
			if !t.unbound {
				u.Extra[ExtraPodName] = authnv1.ExtraValue{t.pod}
				u.Extra[ExtraPodUID] = authnv1.ExtraValue{t.uid}
				if t.node != "" {
					u.Extra[ExtraNodeName] = authnv1.ExtraValue{t.node}
				}
			}
			tr.Status = authnv1.TokenReviewStatus{Authenticated: true, User: u, Audiences: tr.Spec.Audiences}
		}
		return true, tr, nil
	})
	return f
}

func (f *fakeKube) setToken(name string, t token) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tokens[name] = t
}

func pod(ns, name, uid, sa, node string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid)},
		Spec: corev1.PodSpec{ServiceAccountName: sa, NodeName: node}, Status: corev1.PodStatus{Phase: corev1.PodRunning}}
}

// testCA is a Server on loopback TLS with a fake API server behind it.
type testCA struct {
	kube  *fakeKube
	ca    *builtinca.CA
	srv   *Server
	addr  string
	reg   *prometheus.Registry
	clock *fakeNow
	dir   string
}

type fakeNow struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeNow) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeNow) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newCA(t *testing.T) *builtinca.CA {
	t.Helper()
	trust := spiffeid.RequireTrustDomainFromString(td)
	cert, key, err := builtinca.GenerateRoot(builtinca.Options{TrustDomain: trust})
	if err != nil {
		t.Fatal(err)
	}
	ca, err := builtinca.New(map[string][]byte{builtinca.CertFile: cert, builtinca.KeyFile: key}, builtinca.Options{TrustDomain: trust})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func startTestCA(t *testing.T, o Options) *testCA {
	t.Helper()
	kube := newFakeKube(
		pod("warren-system", "agent-1", "uid-agent-1", "warren-nodeagent", "node1"),
		pod("warren-system", "agent-2", "uid-agent-2", "warren-nodeagent", "node2"),
		pod("default", "client1", "uid-client1", "client", "node1"),
		pod("default", "server2", "uid-server2", "server", "node2"),
		func() *corev1.Pod {
			p := pod("default", "done1", "uid-done1", "batch", "node1")
			p.Status.Phase = corev1.PodSucceeded
			return p
		}(),
	)
	pods, err := NewPodIndex(kube, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	pods.Start(ctx)
	if !pods.WaitForSync(ctx) {
		t.Fatal("pod index did not sync")
	}
	tc := &testCA{kube: kube, ca: newCA(t), reg: prometheus.NewRegistry(), clock: &fakeNow{t: time.Now()}, dir: t.TempDir()}
	o.CA, o.Kube, o.Pods, o.Registry, o.Now = tc.ca, kube, pods, tc.reg, tc.clock.Now
	o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	if o.NodeAgents == nil {
		o.NodeAgents = []types.NamespacedName{nodeAgentSA}
	}
	if tc.srv, err = New(o); err != nil {
		t.Fatal(err)
	}
	sc, err := NewServingCert(tc.ca, []string{"127.0.0.1"}, nil, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(sc.TLSConfig())))
	pb.RegisterIstioCertificateServiceServer(gs, tc.srv)
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	tc.addr = ln.Addr().String()

	for name, tok := range map[string]token{
		"agent1":          {ns: "warren-system", sa: "warren-nodeagent", pod: "agent-1", uid: "uid-agent-1", node: "node1", aud: []string{"istio-ca"}},
		"agent1-nonode":   {ns: "warren-system", sa: "warren-nodeagent", pod: "agent-1", uid: "uid-agent-1", aud: []string{"istio-ca"}},
		"agent1-liar":     {ns: "warren-system", sa: "warren-nodeagent", pod: "agent-1", uid: "uid-agent-1", node: "node2", aud: []string{"istio-ca"}},
		"agent1-old-uid":  {ns: "warren-system", sa: "warren-nodeagent", pod: "agent-1", uid: "uid-before", node: "node1", aud: []string{"istio-ca"}},
		"agent1-gone-pod": {ns: "warren-system", sa: "warren-nodeagent", pod: "agent-9", uid: "uid-agent-9", node: "node1", aud: []string{"istio-ca"}},
		"agent1-wrongaud": {ns: "warren-system", sa: "warren-nodeagent", pod: "agent-1", uid: "uid-agent-1", node: "node1", aud: []string{"kubernetes.default.svc"}},
		"agent1-expired":  {ns: "warren-system", sa: "warren-nodeagent", pod: "agent-1", uid: "uid-agent-1", node: "node1", aud: []string{"istio-ca"}, expired: true},
		"agent1-unbound":  {ns: "warren-system", sa: "warren-nodeagent", aud: []string{"istio-ca"}, unbound: true},
		"agent1-sa-lie":   {ns: "warren-system", sa: "other", pod: "agent-1", uid: "uid-agent-1", node: "node1", aud: []string{"istio-ca"}},
		"client1":         {ns: "default", sa: "client", pod: "client1", uid: "uid-client1", node: "node1", aud: []string{"istio-ca"}},
		"user":            {notSA: true, pod: "agent-1", uid: "uid-agent-1", aud: []string{"istio-ca"}},
		"review-fails":    {reviewFailure: true},
	} {
		kube.setToken(name, tok)
	}
	return tc
}

// client returns the node agent's client (pkg/identity/istioca) sending
// tokenName's token; self is its own identity (no impersonation for it).
func (tc *testCA) client(t *testing.T, tokenName string, self identity.Identity) *istioca.Client {
	t.Helper()
	path := filepath.Join(tc.dir, tokenName+".token")
	if err := os.WriteFile(path, []byte(tokenName+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	for _, r := range tc.ca.Bundle().X509Authorities() {
		roots.AddCert(r)
	}
	c, err := istioca.New(istioca.Options{Addr: tc.addr, TokenFile: path, Self: self, TTL: time.Hour,
		TLS: &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func id(t *testing.T, ns, sa string) identity.Identity {
	t.Helper()
	i, err := identity.New(td, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return i
}

// reasonOf extracts the refusal reason from a status message.
func reasonOf(err error) string {
	if err == nil {
		return ""
	}
	msg := status.Convert(errors.Unwrap(err)).Message()
	if msg == "" {
		msg = err.Error()
	}
	_, rest, ok := strings.Cut(msg, "refused (")
	if !ok {
		return ""
	}
	r, _, _ := strings.Cut(rest, ")")
	return r
}

func TestCreateCertificate(t *testing.T) {
	tc := startTestCA(t, Options{})
	client := id(t, "default", "client")
	for _, tt := range []struct {
		name     string
		token    string
		self     identity.Identity // zero: the agent impersonates
		want     identity.Identity
		reason   string // "" when issued
		code     codes.Code
		contains string
	}{
		{name: "node agent for a pod on its node", token: "agent1", want: client},
		{name: "node from the bound pod when the token names none", token: "agent1-nonode", want: client},
		{name: "pod for itself", token: "client1", self: client, want: client},
		{name: "node agent for a pod on another node", token: "agent1", want: id(t, "default", "server"),
			reason: ReasonNoPodOnNode, code: codes.PermissionDenied, contains: "no pod with ServiceAccount default/server is scheduled on node node1"},
		{name: "finished pod confers nothing", token: "agent1", want: id(t, "default", "batch"), reason: ReasonNoPodOnNode, code: codes.PermissionDenied},
		{name: "no pod of that identity anywhere", token: "agent1", want: id(t, "default", "nobody"), reason: ReasonNoPodOnNode, code: codes.PermissionDenied},
		{name: "other service account may not impersonate", token: "client1", want: id(t, "default", "server"),
			reason: ReasonNotNodeAgent, code: codes.PermissionDenied, contains: "only the node agents' ServiceAccounts (warren-system/warren-nodeagent) may impersonate"},
		{name: "pod of the same node, other service account", token: "client1", want: id(t, "warren-system", "warren-nodeagent"), reason: ReasonNotNodeAgent, code: codes.PermissionDenied},
		{name: "wrong audience", token: "agent1-wrongaud", want: client, reason: ReasonWrongAudience, code: codes.Unauthenticated, contains: "project the token with audience istio-ca"},
		{name: "expired token", token: "agent1-expired", want: client, reason: ReasonTokenExpired, code: codes.Unauthenticated, contains: "has expired"},
		{name: "forged token", token: "forged", want: client, reason: ReasonTokenInvalid, code: codes.Unauthenticated},
		{name: "token not bound to a pod", token: "agent1-unbound", want: client, reason: ReasonNotPodBound, code: codes.Unauthenticated, contains: "not bound to a Pod"},
		{name: "not a service account", token: "user", want: client, reason: ReasonNotServiceAccount, code: codes.Unauthenticated},
		{name: "token of a deleted pod", token: "agent1-gone-pod", want: client, reason: ReasonCallerPodUnknown, code: codes.PermissionDenied},
		{name: "token of a recreated pod", token: "agent1-old-uid", want: client, reason: ReasonCallerPodUnknown, code: codes.PermissionDenied, contains: "recreated"},
		{name: "token's service account is not its pod's", token: "agent1-sa-lie", want: client, reason: ReasonCallerPodUnknown, code: codes.PermissionDenied},
		{name: "token's node is not its pod's", token: "agent1-liar", want: client, reason: ReasonNodeUnknown, code: codes.PermissionDenied, contains: "the token says node node2"},
		{name: "other trust domain", token: "agent1", want: func() identity.Identity { i, _ := identity.New("other.td", "default", "client"); return i }(),
			reason: ReasonBadIdentity, code: codes.PermissionDenied},
		{name: "token review unavailable", token: "review-fails", want: client, reason: ReasonReviewFailed, code: codes.Unavailable, contains: "RBAC"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			svid, bundle, err := tc.client(t, tt.token, tt.self).Fetch(t.Context(), tt.want)
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if err := identity.CheckSVID(tt.want, svid, bundle, time.Now()); err != nil {
					t.Fatalf("issued an invalid SVID: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("issued %s, want refusal %s", svid.ID, tt.reason)
			}
			if got := reasonOf(err); got != tt.reason {
				t.Errorf("reason %q, want %q (%v)", got, tt.reason, err)
			}
			if got := status.Code(errors.Unwrap(err)); got != tt.code {
				t.Errorf("code %v, want %v (%v)", got, tt.code, err)
			}
			if !strings.Contains(err.Error(), tt.contains) {
				t.Errorf("error %q does not say %q", err, tt.contains)
			}
		})
	}
	if got := testutil.ToFloat64(tc.srv.issued); got != 3 {
		t.Errorf("warren_ca_certificates_issued_total = %v, want 3", got)
	}
	if got := testutil.ToFloat64(tc.srv.refused.WithLabelValues(ReasonNoPodOnNode)); got != 3 {
		t.Errorf("refused{no_pod_on_node} = %v, want 3", got)
	}
	if n, err := testutil.GatherAndCount(tc.reg, "warren_ca_requests_refused_total"); err != nil || n != len(Reasons) {
		t.Errorf("refused series = %d (%v), want one per reason (%d)", n, err, len(Reasons))
	}
}

// rawRequest sends a CreateCertificate with a CSR for csrID while asking for want.
func (tc *testCA) rawRequest(t *testing.T, tokenName string, csrPEM string, want identity.Identity) error {
	t.Helper()
	roots := x509.NewCertPool()
	for _, r := range tc.ca.Bundle().X509Authorities() {
		roots.AddCert(r)
	}
	conn, err := grpc.NewClient(tc.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+tokenName)
	_, err = pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csrPEM,
		Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{istioca.ImpersonatedIdentityKey: structpb.NewStringValue(want.String())}}})
	return err
}

func csrFor(t *testing.T, uris ...string) string {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		pu, _ := url.Parse(u)
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func TestCSRMustNameTheAuthorizedIdentity(t *testing.T) {
	tc := startTestCA(t, Options{})
	client := id(t, "default", "client")
	for _, tt := range []struct {
		name, csr, reason string
	}{
		{name: "matching", csr: csrFor(t, client.String())},
		{name: "CSR for another identity", csr: csrFor(t, "spiffe://cluster.local/ns/default/sa/server"), reason: ReasonBadCSR},
		{name: "CSR with two identities", csr: csrFor(t, client.String(), "spiffe://cluster.local/ns/default/sa/server"), reason: ReasonBadCSR},
		{name: "no CSR", csr: "", reason: ReasonBadCSR},
		{name: "garbage", csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", reason: ReasonBadCSR},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tc.rawRequest(t, "agent1", tt.csr, client)
			if got := reasonOf(err); got != tt.reason {
				t.Errorf("reason %q, want %q (%v)", got, tt.reason, err)
			}
		})
	}
	if err := tc.rawRequest(t, "", csrFor(t, client.String()), client); reasonOf(err) != ReasonNoToken {
		t.Errorf("empty bearer: %v, want %s", err, ReasonNoToken)
	}
}

// A pod that moves (deleted on node1, created on node2, as a
// rescheduled pod is) can no longer be signed for by node1's agent.
func TestPodMovedToAnotherNode(t *testing.T) {
	tc := startTestCA(t, Options{})
	client := id(t, "default", "client")
	agent1 := tc.client(t, "agent1", identity.Identity{})
	if _, _, err := agent1.Fetch(t.Context(), client); err != nil {
		t.Fatalf("before the move: %v", err)
	}
	pods := tc.kube.CoreV1().Pods("default")
	if err := pods.Delete(t.Context(), "client1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pods.Create(t.Context(), pod("default", "client1", "uid-client1-b", "client", "node2"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	agent2 := tc.client(t, "agent2", identity.Identity{})
	tc.kube.setToken("agent2", token{ns: "warren-system", sa: "warren-nodeagent", pod: "agent-2", uid: "uid-agent-2", node: "node2", aud: []string{"istio-ca"}})
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, _, err1 := agent1.Fetch(t.Context(), client)
		_, _, err2 := agent2.Fetch(t.Context(), client)
		if reasonOf(err1) == ReasonNoPodOnNode && err2 == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the move: node1's agent got %v (want %s), node2's got %v (want a certificate)", err1, ReasonNoPodOnNode, err2)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRateLimitPerCaller(t *testing.T) {
	tc := startTestCA(t, Options{Rate: 2, Burst: 3})
	client := id(t, "default", "client")
	agent1 := tc.client(t, "agent1", identity.Identity{})
	self := tc.client(t, "client1", client)
	for i := range 3 {
		if _, _, err := agent1.Fetch(t.Context(), client); err != nil {
			t.Fatalf("request %d within the burst: %v", i+1, err)
		}
	}
	_, _, err := agent1.Fetch(t.Context(), client)
	if reasonOf(err) != ReasonRateLimited || status.Code(errors.Unwrap(err)) != codes.ResourceExhausted {
		t.Fatalf("4th request at once: %v, want %s (ResourceExhausted)", err, ReasonRateLimited)
	}
	if !strings.Contains(err.Error(), "retry in 500ms") {
		t.Errorf("refusal does not say when to retry: %v", err)
	}
	// Another caller has its own bucket.
	if _, _, err := self.Fetch(t.Context(), client); err != nil {
		t.Errorf("another caller was limited by the first: %v", err)
	}
	tc.clock.Add(500 * time.Millisecond) // one token at 2/s
	if _, _, err := agent1.Fetch(t.Context(), client); err != nil {
		t.Errorf("after refill: %v", err)
	}
	if got := testutil.ToFloat64(tc.srv.refused.WithLabelValues(ReasonRateLimited)); got != 1 {
		t.Errorf("refused{rate_limited} = %v, want 1", got)
	}
}

func TestTTLCapped(t *testing.T) {
	for _, tt := range []struct {
		name   string
		max    time.Duration
		asked  time.Duration // the client asks for 1 h
		wantLE time.Duration
	}{
		{name: "client's TTL under the cap", max: 2 * time.Hour, wantLE: time.Hour + time.Minute},
		{name: "cap under the client's TTL", max: 10 * time.Minute, wantLE: 10*time.Minute + time.Minute},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tc := startTestCA(t, Options{MaxTTL: tt.max})
			svid, _, err := tc.client(t, "agent1", identity.Identity{}).Fetch(t.Context(), id(t, "default", "client"))
			if err != nil {
				t.Fatal(err)
			}
			leaf := svid.Certificates[0]
			if got := leaf.NotAfter.Sub(leaf.NotBefore); got > tt.wantLE || got < tt.wantLE-2*time.Minute {
				t.Errorf("validity %v, want about %v", got, tt.wantLE-time.Minute)
			}
		})
	}
}

func TestServingCertRotates(t *testing.T) {
	ca := newCA(t)
	clock := &fakeNow{t: time.Now()}
	sc, err := NewServingCert(ca, []string{"warren-ca.warren-system.svc", "127.0.0.1"}, nil, 10*time.Minute, clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	first := sc.Leaf()
	roots := x509.NewCertPool()
	roots.AddCert(ca.Bundle().X509Authorities()[0])
	for _, name := range []string{"warren-ca.warren-system.svc", "127.0.0.1"} {
		if _, err := first.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("serving certificate does not verify from the root for %s: %v", name, err)
		}
	}
	clock.Add(4 * time.Minute)
	if sc.Leaf().SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Error("renewed before half-life")
	}
	clock.Add(2 * time.Minute)
	if sc.Leaf().SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Error("not renewed past half-life")
	}
	if _, err := NewServingCert(ca, nil, nil, 0, nil); err == nil {
		t.Error("a serving certificate without a name was issued")
	}
}

func TestSplitSAUser(t *testing.T) {
	for _, tt := range []struct {
		in     string
		ns, sa string
		ok     bool
	}{
		{"system:serviceaccount:default:client", "default", "client", true},
		{"system:serviceaccount:default", "", "", false},
		{"system:serviceaccount::x", "", "", false},
		{"system:serviceaccount:a:b:c", "", "", false},
		{"system:node:node1", "", "", false},
		{"", "", "", false},
	} {
		ns, sa, ok := splitSAUser(tt.in)
		if ns != tt.ns || sa != tt.sa || ok != tt.ok {
			t.Errorf("splitSAUser(%q) = %q, %q, %v", tt.in, ns, sa, ok)
		}
	}
}
