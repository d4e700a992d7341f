package testpki

import (
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestIssue(t *testing.T) {
	ca := NewCA(t, "cluster.local")
	other := NewCA(t, "other.test")
	tests := []struct {
		name    string
		svid    *SVID
		wantErr string
	}{
		{"valid", ca.IssueWorkload(t, "ns1", "sa1"), ""},
		{"expired", ca.IssueWorkload(t, "ns1", "sa1", Expired()), "expired"},
		{"not yet valid", ca.IssueWorkload(t, "ns1", "sa1", NotYetValid()), "not yet valid"},
		{"other trust domain", other.IssueWorkload(t, "ns1", "sa1"), "no X.509 bundle found"},
		{"same domain other CA", NewCA(t, "cluster.local").IssueWorkload(t, "ns1", "sa1"), "unknown authority"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, _, err := x509svid.Verify(tt.svid.X509.Certificates, ca.Bundle())
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("verify: %v", err)
				}
				if id != tt.svid.ID || id.String() != "spiffe://cluster.local/ns/ns1/sa/sa1" {
					t.Fatalf("id %s, want %s", id, tt.svid.ID)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("verify error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
	noURI := ca.IssueWorkload(t, "ns1", "sa1", NoURISAN())
	if len(noURI.Leaf().URIs) != 0 {
		t.Fatalf("NoURISAN certificate has URIs %v", noURI.Leaf().URIs)
	}
	if _, _, err := x509svid.Verify(noURI.X509.Certificates, ca.Bundle()); err == nil {
		t.Fatal("certificate without URI SAN verified")
	}
	if !ca.Pool().Equal(ca.Pool()) || len(ca.Bundle().X509Authorities()) != 1 {
		t.Fatal("bundle or pool does not hold the root")
	}
}
