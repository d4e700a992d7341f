// Package istioca obtains workload certificates from Istio's CA (istiod, or
// any implementation of istio.v1.auth.IstioCertificateService), the way
// ztunnel does: one CreateCertificate call per identity with a CSR carrying
// the identity's URI SAN, the node agent's service-account token as bearer
// credentials, and the ImpersonatedIdentity metadata that lets a trusted node
// agent ask for the identities of the pods on its node.
package istioca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/warren-mesh/warren/pkg/identity"
)

// Metadata and header names understood by istiod.
const (
	// ImpersonatedIdentityKey is the request metadata field naming the identity
	// the certificate is for when it is not the caller's own.
	ImpersonatedIdentityKey = "ImpersonatedIdentity"
	// ClusterIDHeader names the caller's cluster in multi-cluster meshes.
	ClusterIDHeader = "clusterid"
)

// DefaultTTL is the certificate lifetime requested.
const DefaultTTL = 24 * time.Hour

// Options configure a Client.
type Options struct {
	// Addr is the CA's gRPC address, e.g. istiod.istio-system.svc:15012. Required.
	Addr string
	// TLS configures the connection to the CA (its roots and server name). Required.
	TLS *tls.Config
	// TokenFile holds the bearer token sent with every request: the agent's
	// projected service-account token with audience istio-ca. It is read at
	// each request, so token rotation needs nothing. Required.
	TokenFile string
	// ClusterID, when set, is sent in the ClusterID header.
	ClusterID string
	// Self is the agent's own identity: requests for it carry no
	// ImpersonatedIdentity.
	Self identity.Identity
	// TTL is the validity requested (DefaultTTL when zero); the CA may shorten it.
	TTL time.Duration
	// Roots, when set, are the trust anchors returned with each certificate.
	// Otherwise the root is the last certificate of the CA's chain, which must
	// then be self-signed.
	Roots []*x509.Certificate
	// DialOptions are appended to the gRPC dial options.
	DialOptions []grpc.DialOption
}

// Client is an identity.Provider backed by IstioCertificateService.
type Client struct {
	opts   Options
	conn   *grpc.ClientConn
	client pb.IstioCertificateServiceClient
}

// New returns a client of the CA at opts.Addr. It connects lazily, so a CA
// that is down does not stop startup; Fetch reports it.
func New(opts Options) (*Client, error) {
	switch {
	case opts.Addr == "":
		return nil, errors.New("istio ca client: no address")
	case opts.TLS == nil:
		return nil, errors.New("istio ca client: no TLS configuration for the CA connection")
	case opts.TokenFile == "":
		return nil, errors.New("istio ca client: no token file")
	}
	if opts.TTL <= 0 {
		opts.TTL = DefaultTTL
	}
	dial := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(opts.TLS))}, opts.DialOptions...)
	conn, err := grpc.NewClient(opts.Addr, dial...)
	if err != nil {
		return nil, fmt.Errorf("istio ca client for %s: %w", opts.Addr, err)
	}
	return &Client{opts: opts, conn: conn, client: pb.NewIstioCertificateServiceClient(conn)}, nil
}

// Close closes the connection to the CA.
func (c *Client) Close() error { return c.conn.Close() }

// Fetch asks the CA for a certificate for id over a new ECDSA P-256 key.
func (c *Client) Fetch(ctx context.Context, id identity.Identity) (*x509svid.SVID, *x509bundle.Bundle, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate for %s: generate key: %w", id, err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.SPIFFEID().URL()}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate for %s: create CSR: %w", id, err)
	}
	token, err := os.ReadFile(c.opts.TokenFile)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate for %s: read token: %w", id, err)
	}
	bearer := strings.TrimSpace(string(token))
	if bearer == "" {
		return nil, nil, fmt.Errorf("create certificate for %s: token file %s is empty", id, c.opts.TokenFile)
	}
	md := metadata.Pairs("authorization", "Bearer "+bearer)
	if c.opts.ClusterID != "" {
		md.Set(ClusterIDHeader, c.opts.ClusterID)
	}
	req := &pb.IstioCertificateRequest{
		Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr})),
		ValidityDuration: int64(c.opts.TTL / time.Second),
	}
	if id != c.opts.Self {
		req.Metadata = &structpb.Struct{Fields: map[string]*structpb.Value{
			ImpersonatedIdentityKey: structpb.NewStringValue(id.String()),
		}}
	}
	resp, err := c.client.CreateCertificate(metadata.NewOutgoingContext(ctx, md), req)
	if err != nil {
		if status.Code(err) == codes.Unavailable {
			return nil, nil, fmt.Errorf("create certificate for %s: CA unreachable at %s: %w", id, c.opts.Addr, err)
		}
		return nil, nil, fmt.Errorf("create certificate for %s at %s: %w", id, c.opts.Addr, err)
	}
	svid, bundle, err := c.parseResponse(id, key, resp.GetCertChain())
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate for %s: CA at %s answered: %w", id, c.opts.Addr, err)
	}
	return svid, bundle, nil
}

// parseResponse turns the CA's chain (leaf first, root last) into an SVID and bundle.
func (c *Client) parseResponse(id identity.Identity, key *ecdsa.PrivateKey, chain []string) (*x509svid.SVID, *x509bundle.Bundle, error) {
	if len(chain) == 0 {
		return nil, nil, errors.New("empty certificate chain")
	}
	var certs []*x509.Certificate
	for i, s := range chain {
		rest := []byte(s)
		n := 0
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				return nil, nil, fmt.Errorf("chain element %d: PEM block %q, want CERTIFICATE", i, block.Type)
			}
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("chain element %d: %w", i, err)
			}
			certs = append(certs, cert)
			n++
		}
		if n == 0 {
			return nil, nil, fmt.Errorf("chain element %d: no PEM certificate", i)
		}
	}
	leaf := certs[0]
	if got, err := x509svid.IDFromCert(leaf); err != nil {
		return nil, nil, fmt.Errorf("leaf certificate: %w", err)
	} else if got != id.SPIFFEID() {
		return nil, nil, fmt.Errorf("leaf certificate is for %s, requested %s", got, id)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return nil, nil, errors.New("leaf certificate is not for the key in the CSR")
	}

	roots := c.opts.Roots
	rest := certs[1:]
	if last := certs[len(certs)-1]; len(certs) > 1 && last.IsCA && last.CheckSignatureFrom(last) == nil {
		rest = certs[1 : len(certs)-1]
		if roots == nil {
			roots = []*x509.Certificate{last}
		}
	}
	if len(roots) == 0 {
		return nil, nil, errors.New("chain ends without a self-signed root and no trust anchors are configured")
	}
	bundle := x509bundle.FromX509Authorities(id.TrustDomain, roots)
	svid := &x509svid.SVID{ID: id.SPIFFEID(), Certificates: append([]*x509.Certificate{leaf}, rest...), PrivateKey: key}
	return svid, bundle, nil
}
