// Package policy decides L4 authorization for inbound connections with
// Istio's AuthorizationPolicy semantics, as ztunnel applies them:
//
//  1. a STRICT peer-authentication mode refuses a connection without a peer
//     identity (Istio converts STRICT into such a deny; warren keeps it as a mode);
//  2. if any DENY policy that applies to the destination matches, deny;
//  3. if no ALLOW policy applies to the destination, allow;
//  4. if any ALLOW policy matches, allow;
//  5. otherwise deny.
//
// References: https://istio.io/latest/docs/reference/config/security/authorization-policy/
// (the evaluation order above, and principals/namespaces as exact, "prefix*",
// "*suffix" or "*" presence matches), and ztunnel's src/rbac.rs and
// src/state.rs assert_rbac (github.com/istio/ztunnel at 62d826530e5c) for
// the L4 structure: a policy matches if any rule matches; a rule if every
// clause matches (a rule with no clause always matches); a clause if any of
// its matches matches; a match if every field it sets matches, where a
// positive field needs one entry to match and a not- field needs none to.
// A policy with no rules matches nothing ("allow-nothing" as ALLOW).
// Dry-run policies are evaluated and reported but never decide.
//
// Rules that hold a value a provider could not parse fail closed
// (config.AuthorizationPolicy.Invalid, package istioval): they are absent
// from an ALLOW policy, so they allow nobody, and they make a DENY policy
// match every connection in its scope.
//
// Principals are matched against the peer's SPIFFE ID without "spiffe://"
// ("cluster.local/ns/a/sa/b"); a connection without identity (plaintext)
// has no principal and no namespace, so a principal or namespace match
// never matches it and a not- match always does.
package policy

import (
	"net/netip"
	"strings"

	"github.com/warren-mesh/warren/pkg/config"
)

// Conn is what authorization sees of an inbound connection.
type Conn struct {
	// SrcIdentity is the peer's SPIFFE ID (spiffe://td/ns/x/sa/y), empty
	// for plaintext connections.
	SrcIdentity string
	SrcIP       netip.Addr
	// DstIP and DstPort are the address the client asked for (the workload
	// IP and the target port).
	DstIP   netip.Addr
	DstPort uint16
}

// Source gives the policies and peer-authentication mode that apply to a
// destination workload; *config.Snapshot implements it.
type Source interface {
	PoliciesFor(w *config.Workload) []*config.AuthorizationPolicy
	MTLSMode(w *config.Workload) config.MTLSMode
}

// Reason says why a decision was taken; it is stable text for logs and metric labels.
type Reason string

// Decision reasons.
const (
	// ReasonNoAllowPolicy: allowed because no ALLOW policy applies.
	ReasonNoAllowPolicy Reason = "no_allow_policy"
	// ReasonAllowMatched: allowed by the ALLOW policy in Decision.Policy.
	ReasonAllowMatched Reason = "allow_matched"
	// ReasonDenyMatched: denied by the DENY policy in Decision.Policy.
	ReasonDenyMatched Reason = "deny_matched"
	// ReasonNoAllowMatched: denied because ALLOW policies apply and none matched.
	ReasonNoAllowMatched Reason = "no_allow_matched"
	// ReasonStrictPlaintext: denied because the destination's mode is STRICT
	// and the connection has no peer identity.
	ReasonStrictPlaintext Reason = "strict_plaintext"
)

// Decision is the outcome of Authorize.
type Decision struct {
	Allowed bool
	Reason  Reason
	// Policy is the policy that decided (a matching DENY or ALLOW), or nil.
	Policy *config.AuthorizationPolicy
	// DryRun lists the dry-run policies that matched, for logging.
	DryRun []*config.AuthorizationPolicy
}

// PolicyKey returns the deciding policy's "namespace/name", or "".
func (d Decision) PolicyKey() string {
	if d.Policy == nil {
		return ""
	}
	return d.Policy.Key()
}

// String renders the decision for logs, e.g. "deny (deny_matched default/no-legacy)".
func (d Decision) String() string {
	verdict := "deny"
	if d.Allowed {
		verdict = "allow"
	}
	if k := d.PolicyKey(); k != "" {
		return verdict + " (" + string(d.Reason) + " " + k + ")"
	}
	return verdict + " (" + string(d.Reason) + ")"
}

// Authorize decides whether c may reach the destination workload dst.
func Authorize(src Source, dst *config.Workload, c Conn) Decision {
	var d Decision
	if c.SrcIdentity == "" && src.MTLSMode(dst) == config.MTLSStrict {
		d.Reason = ReasonStrictPlaintext
		return d
	}
	pc := newPeer(c)
	policies := src.PoliciesFor(dst)
	for _, p := range policies {
		if p.DryRun && matches(p, &pc) {
			d.DryRun = append(d.DryRun, p)
		}
	}
	for _, p := range policies {
		if p.Action == config.ActionDeny && !p.DryRun && matches(p, &pc) {
			d.Reason, d.Policy = ReasonDenyMatched, p
			return d
		}
	}
	anyAllow := false
	for _, p := range policies {
		if p.Action != config.ActionAllow || p.DryRun {
			continue
		}
		anyAllow = true
		if matches(p, &pc) {
			d.Allowed, d.Reason, d.Policy = true, ReasonAllowMatched, p
			return d
		}
	}
	if !anyAllow {
		d.Allowed, d.Reason = true, ReasonNoAllowPolicy
		return d
	}
	d.Reason = ReasonNoAllowMatched
	return d
}

// Matches reports whether policy p matches connection c, whatever its action.
func Matches(p *config.AuthorizationPolicy, c Conn) bool {
	pc := newPeer(c)
	return matches(p, &pc)
}

// peer is a Conn with its identity parsed once.
type peer struct {
	Conn
	principal      string // SPIFFE ID without "spiffe://", "" if none
	namespace      string
	serviceAccount string
}

func newPeer(c Conn) peer {
	p := peer{Conn: c}
	p.SrcIP = c.SrcIP.Unmap()
	p.DstIP = c.DstIP.Unmap()
	if rest, ok := strings.CutPrefix(c.SrcIdentity, "spiffe://"); ok {
		p.principal = rest
		p.namespace, p.serviceAccount = parseIstioID(rest)
	}
	return p
}

// parseIstioID splits "<td>/ns/<ns>/sa/<sa>"; other forms have no namespace.
func parseIstioID(id string) (ns, sa string) {
	_, rest, ok := strings.Cut(id, "/ns/")
	if !ok {
		return "", ""
	}
	ns, sa, ok = strings.Cut(rest, "/sa/")
	if !ok || ns == "" || sa == "" || strings.Contains(ns, "/") || strings.Contains(sa, "/") {
		return "", ""
	}
	return ns, sa
}

func matches(p *config.AuthorizationPolicy, c *peer) bool {
	if p.Action == config.ActionDeny && len(p.Invalid) > 0 {
		return true // a DENY rule we could not read denies its whole scope
	}
	for _, rule := range p.Rules {
		if ruleMatches(rule, c) {
			return true
		}
	}
	return false
}

func ruleMatches(rule config.Rule, c *peer) bool {
	for _, clause := range rule {
		if len(clause) == 0 {
			continue // an empty clause puts no condition
		}
		ok := false
		for i := range clause {
			if m := &clause[i]; !m.IsEmpty() && matchMatches(m, c) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

func matchMatches(m *config.Match, c *peer) bool {
	return field(m.DestinationIPs, m.NotDestinationIPs, func(p netip.Prefix) bool { return p.Contains(c.DstIP) }) &&
		field(m.SourceIPs, m.NotSourceIPs, func(p netip.Prefix) bool { return p.Contains(c.SrcIP) }) &&
		field(m.DestinationPorts, m.NotDestinationPorts, func(p uint16) bool { return p == c.DstPort }) &&
		field(m.ServiceAccounts, m.NotServiceAccounts, func(s config.ServiceAccountMatch) bool {
			return c.namespace != "" && s.Namespace == c.namespace && s.ServiceAccount == c.serviceAccount
		}) &&
		field(m.Principals, m.NotPrincipals, func(s config.StringMatch) bool { return c.principal != "" && s.Matches(c.principal) }) &&
		field(m.Namespaces, m.NotNamespaces, func(s config.StringMatch) bool { return c.namespace != "" && s.Matches(c.namespace) })
}

// field applies one positive list (any must match, if set) and its negation
// (none may match, if set).
func field[T any](positive, negative []T, match func(T) bool) bool {
	if len(positive) > 0 && !anyOf(positive, match) {
		return false
	}
	return len(negative) == 0 || !anyOf(negative, match)
}

func anyOf[T any](xs []T, match func(T) bool) bool {
	for _, x := range xs {
		if match(x) {
			return true
		}
	}
	return false
}
