// Package identity owns the SPIFFE workload identities of the pods on this
// node: what an identity is, where its X.509-SVID comes from, how it rotates,
// and how it reaches TLS.
//
// The pieces, in the order data flows through them:
//
//   - [Identity] is spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
//   - A [Provider] turns an identity into an X.509-SVID and its trust bundle.
//     Implementations live in subpackages, one per value of the node agent's
//     --ca-provider flag: builtinca (builtin: an in-process CA whose key and
//     root are read from a directory; on Kubernetes only the CA service,
//     pkg/caserver, loads it, from the chart's Secret), spire (spire: the Delegated Identity API of the node's
//     SPIRE agent) and istioca (istiod: Istio's CreateCertificate with the
//     node agent impersonating each pod's identity; also warren: the same
//     client against warren's CA service, pkg/caserver, which alone holds the
//     CA key and signs only for pods on the caller's node).
//   - The [Manager] holds one ECDSA P-256 SVID per identity that a pod on this
//     node has: [Manager.Acquire] when a pod appears (it returns once the
//     certificate is there, so the pod's first connection never waits on a CA),
//     [Manager.Release] when it leaves. Certificates renew at half-life and
//     failed fetches retry with exponential back-off from 500 ms to 150 s,
//     whichever provider issues them, so no provider needs a restart to rotate.
//   - [Manager.ClientConfig] and [Manager.ServerConfig] build the tls.Config
//     values HBONE uses, with HBONE's TLS rules applied by hbone.HardenTLS.
//     Certificates reach TLS through GetCertificate and GetClientCertificate
//     callbacks, so a rotation changes what the next handshake presents and
//     never touches connections already established.
//
// How the node agent (cmd/nodeagent) wires it:
//
//   - It builds the provider named by --ca-provider and one Manager with
//     Options.ProviderName set to that name. The SPIRE provider also serves
//     as Options.Bundles (SPIRE's trust bundle changes between fetches), and
//     its Run keeps it current while the agent runs. The built-in CA refuses
//     identities no pod of this node has (builtinca.Options.NodeHas, read from
//     the configuration store).
//   - pkg/ztunnel sets up each enrolled pod: Acquire before the pod's listeners
//     open, then the pod's own HBONE listener, inside the pod's network
//     namespace, takes m.ServerConfig(StaticServerIdentity(pod's identity));
//     Release when the pod goes. The outbound side dials through an hbone.Pool
//     whose TLS is the Manager itself (it is a hbone.ClientTLS).
//   - Who may connect is decided by pkg/policy from the client identity
//     hbone.Server verified (ServerRequest.Peer); this package only checks that
//     the client's chain verifies in the destination's trust domain.
//   - Admin and health: Certificates is the /certs view and `nodeagent inspect
//     certs` (identity, provider, pods, state, serial, validity, next refresh,
//     last error); Ready, part of /healthz/ready, names each identity without a
//     valid certificate, the provider asked and why, e.g.
//     "fetch spiffe://td/ns/a/sa/b (provider istiod): create certificate for ...: CA unreachable at ...: retrying in 4s".
//   - Metrics (Options.Registry, labelled by provider):
//     warren_identity_certificates (valid certificates held),
//     warren_identity_identities (identities held),
//     warren_identity_certificate_expiry_seconds{identity} and
//     warren_identity_fetch_errors_total.
package identity

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Identity is a Kubernetes service-account identity in SPIFFE form:
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
// The zero value is not a valid identity. Identity is comparable and can be
// used as a map key.
type Identity struct {
	// TrustDomain is the SPIFFE trust domain, e.g. cluster.local.
	TrustDomain spiffeid.TrustDomain
	// Namespace is the Kubernetes namespace of the workload.
	Namespace string
	// ServiceAccount is the Kubernetes service account of the workload.
	ServiceAccount string
}

// New returns the identity of service account sa in namespace ns of the trust
// domain td, checking that each part is valid in a SPIFFE ID.
func New(td, ns, sa string) (Identity, error) {
	trustDomain, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return Identity{}, fmt.Errorf("parse trust domain %q: %w", td, err)
	}
	id := Identity{TrustDomain: trustDomain, Namespace: ns, ServiceAccount: sa}
	if err := id.Validate(); err != nil {
		return Identity{}, err
	}
	return id, nil
}

// Parse parses spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
func Parse(s string) (Identity, error) {
	sid, err := spiffeid.FromString(s)
	if err != nil {
		return Identity{}, fmt.Errorf("parse identity %q: %w", s, err)
	}
	return FromSPIFFEID(sid)
}

// FromSPIFFEID converts a SPIFFE ID whose path is /ns/<namespace>/sa/<service-account>.
func FromSPIFFEID(sid spiffeid.ID) (Identity, error) {
	if sid.IsZero() {
		return Identity{}, fmt.Errorf("parse identity: empty SPIFFE ID")
	}
	parts := strings.Split(strings.TrimPrefix(sid.Path(), "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return Identity{}, fmt.Errorf("parse identity %q: path %q is not /ns/<namespace>/sa/<service-account>", sid, sid.Path())
	}
	id := Identity{TrustDomain: sid.TrustDomain(), Namespace: parts[1], ServiceAccount: parts[3]}
	if err := id.Validate(); err != nil {
		return Identity{}, err
	}
	return id, nil
}

// Validate reports whether every part of the identity is set and valid.
func (i Identity) Validate() error {
	switch {
	case i.TrustDomain.IsZero():
		return fmt.Errorf("identity ns/%s/sa/%s: empty trust domain", i.Namespace, i.ServiceAccount)
	case i.Namespace == "":
		return fmt.Errorf("identity in %s: empty namespace", i.TrustDomain)
	case i.ServiceAccount == "":
		return fmt.Errorf("identity in %s/ns/%s: empty service account", i.TrustDomain, i.Namespace)
	}
	if _, err := spiffeid.FromSegments(i.TrustDomain, "ns", i.Namespace, "sa", i.ServiceAccount); err != nil {
		return fmt.Errorf("identity %s/ns/%s/sa/%s: %w", i.TrustDomain, i.Namespace, i.ServiceAccount, err)
	}
	return nil
}

// IsZero reports whether i is the zero Identity.
func (i Identity) IsZero() bool { return i == Identity{} }

// SPIFFEID returns the identity as a SPIFFE ID, or the zero ID when i is not valid.
func (i Identity) SPIFFEID() spiffeid.ID {
	sid, err := spiffeid.FromSegments(i.TrustDomain, "ns", i.Namespace, "sa", i.ServiceAccount)
	if err != nil {
		return spiffeid.ID{}
	}
	return sid
}

// String returns the SPIFFE URI, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
func (i Identity) String() string {
	return "spiffe://" + i.TrustDomain.Name() + "/ns/" + i.Namespace + "/sa/" + i.ServiceAccount
}

// MarshalText encodes the identity as its SPIFFE URI.
func (i Identity) MarshalText() ([]byte, error) {
	if i.IsZero() {
		return []byte{}, nil
	}
	return []byte(i.String()), nil
}

// UnmarshalText decodes a SPIFFE URI; empty text gives the zero Identity.
func (i *Identity) UnmarshalText(text []byte) error {
	if len(text) == 0 {
		*i = Identity{}
		return nil
	}
	id, err := Parse(string(text))
	if err != nil {
		return err
	}
	*i = id
	return nil
}
