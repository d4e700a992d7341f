package identity_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/identity"
	"github.com/warren-mesh/warren/pkg/identity/builtinca"
)

// The node agent's life cycle of identities: a CA, a Manager, a pod appearing
// (Acquire), TLS configurations for HBONE, and the pod leaving (Release).
func ExampleManager() {
	dir, _ := os.MkdirTemp("", "warren-ca")
	defer os.RemoveAll(dir)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	ca, err := builtinca.LoadDir(filepath.Join(dir, "ca"), true, builtinca.Options{TrustDomain: td})
	if err != nil {
		fmt.Println(err)
		return
	}
	m, err := identity.NewManager(identity.Options{
		Provider: ca, ProviderName: "builtin", Registry: prometheus.NewRegistry(), Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()

	client, _ := identity.New("cluster.local", "default", "sleep")
	server, _ := identity.New("cluster.local", "default", "httpbin")
	for _, id := range []identity.Identity{client, server} {
		if err := m.Acquire(context.Background(), id); err != nil { // pod scheduled here
			fmt.Println(err)
			return
		}
		defer m.Release(id) // pod gone
	}

	ccfg, _ := m.ClientConfig(client.SPIFFEID(), []spiffeid.ID{server.SPIFFEID()})
	scfg, _ := m.ServerConfig(identity.StaticServerIdentity(server.SPIFFEID()))
	ln, err := tls.Listen("tcp", "127.0.0.1:0", scfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ln.Close()
	done := make(chan spiffeid.ID)
	go func() {
		s, _ := ln.Accept()
		s.(*tls.Conn).Handshake()
		peer, _ := x509svid.IDFromCert(s.(*tls.Conn).ConnectionState().PeerCertificates[0])
		done <- peer
		s.Close()
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), ccfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	peer, _ := x509svid.IDFromCert(c.ConnectionState().PeerCertificates[0])
	fmt.Println("client sees", peer)
	fmt.Println("server sees", <-done)
	fmt.Println(tls.VersionName(c.ConnectionState().Version), c.ConnectionState().NegotiatedProtocol)
	fmt.Println(m.Certificates()[0].Identity, m.Certificates()[0].State, m.Ready())
	c.Close()
	// Output:
	// client sees spiffe://cluster.local/ns/default/sa/httpbin
	// server sees spiffe://cluster.local/ns/default/sa/sleep
	// TLS 1.3 h2
	// spiffe://cluster.local/ns/default/sa/httpbin valid <nil>
}
