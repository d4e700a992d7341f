package hbone

import (
	"crypto/tls"
	"errors"
	"strings"
	"testing"
)

// HardenTLS forces every HBONE rule whatever the configuration it is given
// allowed, leaves that configuration alone, and keeps its own checks.
func TestHardenTLS(t *testing.T) {
	errNext := errors.New("caller's own check")
	lax := func() *tls.Config {
		return &tls.Config{
			MinVersion:         tls.VersionTLS12,
			MaxVersion:         tls.VersionTLS12,
			NextProtos:         []string{"http/1.1"},
			ClientSessionCache: tls.NewLRUClientSessionCache(1),
		}
	}
	tests := []struct {
		name    string
		cfg     func() *tls.Config
		harden  func(*tls.Config) *tls.Config
		suite   uint16
		wantErr string // empty: accepted
	}{
		{"AES-128-GCM", lax, HardenTLS, tls.TLS_AES_128_GCM_SHA256, ""},
		{"AES-256-GCM", lax, HardenTLS, tls.TLS_AES_256_GCM_SHA384, ""},
		{"ChaCha20 refused", lax, HardenTLS, tls.TLS_CHACHA20_POLY1305_SHA256, "TLS_CHACHA20_POLY1305_SHA256 not allowed: HBONE needs AES-GCM"},
		{"caller's check still runs", func() *tls.Config {
			c := lax()
			c.VerifyConnection = func(tls.ConnectionState) error { return errNext }
			return c
		}, HardenTLS, tls.TLS_AES_128_GCM_SHA256, errNext.Error()},
		{"rules first, then the caller's check", func() *tls.Config {
			c := lax()
			c.VerifyConnection = func(tls.ConnectionState) error { return errNext }
			return c
		}, HardenTLS, tls.TLS_CHACHA20_POLY1305_SHA256, "HBONE needs AES-GCM"},
		{"twice", lax, func(c *tls.Config) *tls.Config { return HardenTLS(HardenTLS(c)) }, tls.TLS_AES_256_GCM_SHA384, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := tt.cfg()
			got := tt.harden(in)
			if got.MinVersion != tls.VersionTLS13 || got.MaxVersion != tls.VersionTLS13 {
				t.Errorf("versions %x..%x, want TLS 1.3 only", got.MinVersion, got.MaxVersion)
			}
			if len(got.NextProtos) != 1 || got.NextProtos[0] != ALPN || ALPN != "h2" {
				t.Errorf("NextProtos %q, want [h2]", got.NextProtos)
			}
			if !got.SessionTicketsDisabled || got.ClientSessionCache != nil {
				t.Errorf("resumption left on: tickets disabled %v, client cache %v", got.SessionTicketsDisabled, got.ClientSessionCache)
			}
			if in.MinVersion != tls.VersionTLS12 || in.NextProtos[0] != "http/1.1" || in.SessionTicketsDisabled {
				t.Error("HardenTLS changed the configuration it was given")
			}
			err := got.VerifyConnection(tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tt.suite, NegotiatedProtocol: ALPN})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("VerifyConnection(%s) = %v, want accepted", tls.CipherSuiteName(tt.suite), err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("VerifyConnection(%s) = %v, want %q", tls.CipherSuiteName(tt.suite), err, tt.wantErr)
			}
		})
	}
}

// The server hardens what GetConfigForClient returns too, and refuses a
// per-client configuration that would not ask for a client certificate.
func TestHardenServerPerClient(t *testing.T) {
	for _, tt := range []struct {
		name       string
		clientAuth tls.ClientAuthType
		wantErr    bool
	}{
		{"require any", tls.RequireAnyClientCert, false},
		{"require and verify", tls.RequireAndVerifyClientCert, false},
		{"request only", tls.RequestClientCert, true},
		{"none", tls.NoClientCert, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := hardenServer(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
				return &tls.Config{ClientAuth: tt.clientAuth, MinVersion: tls.VersionTLS12}, nil
			}})
			c, err := cfg.GetConfigForClient(&tls.ClientHelloInfo{})
			if tt.wantErr {
				if err == nil || !strings.Contains(err.Error(), "must require client certificates") {
					t.Fatalf("GetConfigForClient = %v, want a refusal", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.MinVersion != tls.VersionTLS13 || c.NextProtos[0] != ALPN || !c.SessionTicketsDisabled || c.GetConfigForClient != nil {
				t.Errorf("per-client config not hardened: %+v", c)
			}
		})
	}
}
