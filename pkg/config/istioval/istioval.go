// Package istioval parses the values of Istio's authorization API —
// principal and namespace patterns, IP blocks, ports and service accounts —
// into warren's model. It is the one owner of these rules: the local-file,
// Kubernetes and istiod providers all parse through it, so a value means the
// same thing whichever way it reaches the agent.
//
// # Fail closed
//
// Every parser returns an error for a value it cannot read; none skips it.
// Skipping is what turned an ALLOW into allow-all: a rule whose only
// condition was `ipBlocks: ["10.0.0.0/33"]` lost that condition and an
// unconditioned rule matches every peer. What a provider does with the
// error depends on how it can report it:
//
//   - The local-file provider rejects the whole file, naming the line and
//     field, and the previous configuration stays in force: the operator is
//     at the file and can fix it.
//   - The Kubernetes and istiod providers cannot reject an object someone
//     else stored, so they keep the rule and mark it invalid
//     ([config.AuthorizationPolicy.Invalid]). An invalid rule matches
//     nothing in an ALLOW policy and everything in the policy's scope in a
//     DENY policy. Both directions only ever narrow access: an ALLOW rule
//     that cannot be read grants nothing (the workload's other ALLOW rules
//     still do, and if it was the only one, the workload denies everyone,
//     as "allow-nothing"), and a DENY rule that cannot be read denies
//     everyone it might have denied and more. The rest of the configuration
//     applies; the rule is reported in the provider's log, by the
//     warren_config_invalid_rules metric and by `nodeagent inspect policies`.
//
// What Istio does: its validating webhook (pkg/config/validation in
// istio/istio) rejects such AuthorizationPolicies at admission, so they
// normally never exist; istiod's conversion for ztunnel then skips values it
// cannot parse (stringToIP and stringToPort in
// pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go,
// istio/istio at 72b9ef79), which widens access when the webhook is absent
// or set to fail open. warren cannot assume a webhook is installed in front
// of every API server it reads, hence the stricter rule here.
//
// # Syntax
//
// Patterns (principals, namespaces) follow Istio: "abc" exact, "abc*"
// prefix, "*abc" suffix, "*" any non-empty value; "*" anywhere else, an
// empty value, or whitespace is an error. Principals are SPIFFE IDs without
// "spiffe://" ("cluster.local/ns/a/sa/b"); a leading "spiffe://" is removed.
// IP blocks are an address or a CIDR, IPv4 or IPv6 (IPv4-mapped IPv6 is
// unmapped, host bits are masked); zones are errors. Ports are decimal
// 1-65535 (Istio's named ports are not ports at L4). Service accounts are
// "namespace/name" with neither part empty, no further "/" and no wildcard.
package istioval

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/warren-mesh/warren/pkg/config"
)

// Pattern parses an Istio string pattern: "*" presence, "*abc" suffix,
// "abc*" prefix, otherwise exact.
func Pattern(s string) (config.StringMatch, error) {
	if s == "" {
		return config.StringMatch{}, errors.New(`empty pattern (use "*" to match any value)`)
	}
	if strings.TrimSpace(s) != s || strings.ContainsAny(s, " \t\r\n") {
		return config.StringMatch{}, fmt.Errorf("pattern %q contains whitespace", s)
	}
	switch n := strings.Count(s, "*"); {
	case s == "*":
		return config.StringMatch{Kind: config.MatchPresence}, nil
	case n == 0:
		return config.StringMatch{Kind: config.MatchExact, Value: s}, nil
	case n == 1 && s[0] == '*':
		return config.StringMatch{Kind: config.MatchSuffix, Value: s[1:]}, nil
	case n == 1 && s[len(s)-1] == '*':
		return config.StringMatch{Kind: config.MatchPrefix, Value: s[:len(s)-1]}, nil
	}
	return config.StringMatch{}, fmt.Errorf(`pattern %q: "*" is allowed only alone, at the start or at the end`, s)
}

// Principal parses a principal pattern and removes a leading "spiffe://"
// from exact and prefix matches.
func Principal(s string) (config.StringMatch, error) {
	m, err := Pattern(s)
	if err != nil {
		return m, fmt.Errorf("principal: %w", err)
	}
	return TrimSpiffe(m), nil
}

// TrimSpiffe removes "spiffe://" from an exact or prefix match, since
// principals are compared without it.
func TrimSpiffe(m config.StringMatch) config.StringMatch {
	if m.Kind == config.MatchExact || m.Kind == config.MatchPrefix {
		m.Value = strings.TrimPrefix(m.Value, "spiffe://")
	}
	return m
}

// Namespace parses a namespace pattern.
func Namespace(s string) (config.StringMatch, error) {
	m, err := Pattern(s)
	if err != nil {
		return m, fmt.Errorf("namespace: %w", err)
	}
	return m, nil
}

// IPBlock parses an address (a /32 or /128 block) or a CIDR.
func IPBlock(s string) (netip.Prefix, error) {
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return netip.Prefix{}, fmt.Errorf("ip block %q: %w", s, err)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("ip block %q: not an address or CIDR", s)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("ip block %q: zoned addresses are not supported", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Addr().Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, fmt.Errorf("ip block %q: an IPv4-mapped block must be /96 or longer", s)
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}

// Port parses a decimal port number, 1-65535.
func Port(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("port %q: want a number 1-65535 (named ports are not supported at L4)", s)
	}
	return uint16(n), nil
}

// PortNumber checks a numeric port, 1-65535.
func PortNumber(n int64) (uint16, error) {
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d: want a number 1-65535", n)
	}
	return uint16(n), nil
}

// ServiceAccount parses "namespace/name".
func ServiceAccount(s string) (config.ServiceAccountMatch, error) {
	ns, sa, ok := strings.Cut(s, "/")
	if !ok {
		return config.ServiceAccountMatch{}, fmt.Errorf("service account %q: want namespace/name", s)
	}
	m, err := ServiceAccountOf(ns, sa)
	if err != nil {
		return m, fmt.Errorf("service account %q: %w", s, err)
	}
	return m, nil
}

// ServiceAccountOf checks a namespace and a service-account name given apart.
func ServiceAccountOf(namespace, name string) (config.ServiceAccountMatch, error) {
	for _, part := range []struct{ what, v string }{{"namespace", namespace}, {"name", name}} {
		switch {
		case part.v == "":
			return config.ServiceAccountMatch{}, fmt.Errorf("empty %s", part.what)
		case strings.ContainsAny(part.v, "/* \t\r\n"):
			return config.ServiceAccountMatch{}, fmt.Errorf("%s %q: no \"/\", \"*\" or whitespace allowed", part.what, part.v)
		}
	}
	return config.ServiceAccountMatch{Namespace: namespace, ServiceAccount: name}, nil
}

// List parses every value with parse and returns all that parsed and the
// errors of the others, joined (nil if none). Callers must not use a partial
// result when the error is non-nil: that is the fail-open this package
// exists to prevent.
func List[T any](values []string, parse func(string) (T, error)) ([]T, error) {
	var out []T
	var errs []error
	for i, v := range values {
		x, err := parse(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("[%d]: %w", i, err))
			continue
		}
		out = append(out, x)
	}
	return out, errors.Join(errs...)
}
