// Package caserver is warren's CA service (`nodeagent ca serve`): the only
// process of the mesh that holds the root CA's private key. Node agents ask
// it for their pods' certificates over Istio's CA API
// (istio.v1.auth.IstioCertificateService/CreateCertificate, the wire of
// istiod), so the node agent's --ca-provider=warren and --ca-provider=istiod
// are the same client (pkg/identity/istioca).
//
// Every request goes through, in order:
//
//  1. Authentication: the caller's projected ServiceAccount token
//     (gRPC metadata "authorization: Bearer <jwt>") is checked by the
//     Kubernetes TokenReview API with the audiences the service accepts
//     (Options.Audiences, default "istio-ca"). Expired, forged or
//     wrong-audience tokens and tokens not bound to a Pod are refused: the
//     node a caller runs on is taken from its token's bound pod, never from
//     anything the caller says.
//  2. Rate limiting: a token bucket per caller (node and ServiceAccount).
//  3. Authorization (Authorizer): a caller may ask for its own identity; it
//     may ask for another one (gRPC/CSR metadata "ImpersonatedIdentity", as
//     ztunnel sends to istiod) only when its ServiceAccount is one of the
//     node agents' (Options.NodeAgents) and a pod with that ServiceAccount
//     and namespace is scheduled on the caller's node. The caller's node is
//     the TokenReview's user.extra authentication.kubernetes.io/node-name,
//     cross-checked with the bound pod (authentication.kubernetes.io/pod-name
//     and pod-uid) in a Pod informer indexed by node and ServiceAccount: the
//     same rule as istiod's node authorizer
//     (istio/istio security/pkg/server/ca/node_auth.go), so a node agent taken
//     over can mint only the identities of pods already on its own node.
//  4. The CSR must be signed by its key and name exactly the authorized
//     SPIFFE ID; the certificate is signed by builtinca with the requested
//     TTL capped at Options.MaxTTL.
//
// Every refusal is a gRPC status whose message says why (and what to do),
// counted in warren_ca_requests_refused_total{reason}; issued certificates
// are counted in warren_ca_certificates_issued_total.
//
// The service's own TLS certificate (ServingCert) is signed by the same CA
// for the Service's DNS names, so agents verify it from the root certificate
// alone (the chart's ConfigMap), and it is renewed at half-life without a
// restart.
package caserver
