package identity_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/warren-mesh/warren/pkg/identity"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    identity.Identity
		wantErr string
	}{
		{in: "spiffe://cluster.local/ns/default/sa/bookinfo", want: identity.Identity{
			TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"), Namespace: "default", ServiceAccount: "bookinfo"}},
		{in: "spiffe://td/ns/a.b-c_d/sa/x", want: identity.Identity{
			TrustDomain: spiffeid.RequireTrustDomainFromString("td"), Namespace: "a.b-c_d", ServiceAccount: "x"}},
		{in: "", wantErr: "cannot be empty"},
		{in: "spiffe://td", wantErr: "is not /ns/<namespace>/sa/<service-account>"},
		{in: "spiffe://td/ns/a/sa", wantErr: "is not /ns/"},
		{in: "spiffe://td/ns/a/sa/b/c", wantErr: "is not /ns/"},
		{in: "spiffe://td/sa/a/ns/b", wantErr: "is not /ns/"},
		{in: "spiffe://td/ns//sa/b", wantErr: "empty segment"},
		{in: "https://td/ns/a/sa/b", wantErr: "scheme"},
		{in: "spiffe://TD/ns/a/sa/b", wantErr: "trust domain characters"},
		{in: "spiffe://td/ns/a b/sa/c", wantErr: "path segment characters"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := identity.Parse(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse(%q) = %v, %v; want error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("Parse(%q) = %#v, want %#v", tt.in, got, tt.want)
			}
			if got.String() != tt.in || got.SPIFFEID().String() != tt.in {
				t.Fatalf("round trip: String %q SPIFFEID %q, want %q", got.String(), got.SPIFFEID(), tt.in)
			}
		})
	}
}

func TestNewValidates(t *testing.T) {
	if _, err := identity.New("cluster.local", "", "sa"); err == nil || !strings.Contains(err.Error(), "empty namespace") {
		t.Fatalf("empty namespace: %v", err)
	}
	if _, err := identity.New("cluster.local", "ns", ""); err == nil || !strings.Contains(err.Error(), "empty service account") {
		t.Fatalf("empty service account: %v", err)
	}
	if _, err := identity.New("bad td", "ns", "sa"); err == nil {
		t.Fatal("bad trust domain accepted")
	}
	if _, err := identity.New("td", "ns/x", "sa"); err == nil {
		t.Fatal("slash in namespace accepted")
	}
	if !(identity.Identity{}).SPIFFEID().IsZero() {
		t.Fatal("zero identity has a SPIFFE ID")
	}
}

func TestIdentityJSON(t *testing.T) {
	id, err := identity.New("cluster.local", "ns1", "sa1")
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(map[string]identity.Identity{"id": id})
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `{"id":"spiffe://cluster.local/ns/ns1/sa/sa1"}` {
		t.Fatalf("marshal: %s", b)
	}
	var back map[string]identity.Identity
	if err := json.Unmarshal(b, &back); err != nil || back["id"] != id {
		t.Fatalf("unmarshal: %v %v", back, err)
	}
	if err := json.Unmarshal([]byte(`{"id":"spiffe://td/other"}`), &back); err == nil {
		t.Fatal("unmarshal accepted a non-workload SPIFFE ID")
	}
}

// FuzzParse checks that whatever Parse accepts is valid and round-trips.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"spiffe://cluster.local/ns/default/sa/x", "spiffe://td/ns/a/sa/b/c", "spiffe://td/ns/%41/sa/b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := identity.Parse(s)
		if err != nil {
			return
		}
		if err := id.Validate(); err != nil {
			t.Fatalf("Parse(%q) returned invalid %#v: %v", s, id, err)
		}
		again, err := identity.Parse(id.String())
		if err != nil || again != id {
			t.Fatalf("round trip of %q: %#v, %v", id.String(), again, err)
		}
		if id.SPIFFEID().String() != id.String() {
			t.Fatalf("SPIFFEID %q != String %q", id.SPIFFEID(), id.String())
		}
	})
}
