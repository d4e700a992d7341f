package hbone_test

import (
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/warren-mesh/warren/pkg/hbone"
)

// The outbound side of a node agent: one Pool for every local workload,
// one Dial per captured connection, and Relay between the two.
func ExamplePool() {
	var (
		svids   map[spiffeid.ID]x509svid.Source // rotating sources, one per local identity
		bundles x509bundle.Source
		app     net.Conn // the captured application connection
	)
	pool, err := hbone.NewPool(hbone.PoolConfig{
		TLS: hbone.SPIFFEClientTLS{
			SVID: func(src spiffeid.ID) (x509svid.Source, error) {
				if s, ok := svids[src]; ok {
					return s, nil
				}
				return nil, errors.New("no SVID")
			},
			Bundles: bundles,
		},
		// DialContext: dial from the source pod's network namespace with SO_MARK.
	})
	if err != nil {
		log.Fatal(err)
	}
	stream, err := pool.Dial(context.Background(), hbone.Request{
		Source:    spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/a"),
		Expected:  []spiffeid.ID{spiffeid.RequireFromString("spiffe://cluster.local/ns/b/sa/b")},
		Addr:      netip.MustParseAddrPort("198.18.1.2:15008"),
		Authority: netip.MustParseAddrPort("198.18.1.2:8080"),
		Headers:   http.Header{"Forwarded": {`for="198.18.0.5:40000"`}},
	})
	if err != nil {
		log.Fatal(err) // a *hbone.StatusError carries the server's 401/503
	}
	res := hbone.Relay(app, stream)
	log.Printf("sent %d received %d: %v", res.AToB, res.BToA, res.Err)
}

// The inbound side: authorize the peer, connect to the workload, and let
// the server relay.
func ExampleServer() {
	var (
		svid    x509svid.Source
		bundles x509bundle.Source
		ln      net.Listener // 15008 inside the pod's network namespace
	)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	srv, err := hbone.NewServer(hbone.ServerConfig{
		TLS: hbone.ServerTLSConfig(svid, bundles, td),
		Handler: hbone.HandlerFunc(func(ctx context.Context, r *hbone.ServerRequest) (net.Conn, error) {
			if r.Peer.Path() == "/ns/untrusted/sa/default" {
				return nil, hbone.ErrDenied // 401
			}
			return (&net.Dialer{}).DialContext(ctx, "tcp", r.Authority.String()) // error: 503
		}),
	})
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(srv.Serve(ln))
}
