package policy

import (
	"net/netip"
	"testing"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/istioval"
)

// The cases follow the rules documented at
// https://istio.io/latest/docs/reference/config/security/authorization-policy/
// ("If there are any DENY policies that match the request, deny the request.
// If there are no ALLOW policies for the workload, allow the request. If any
// of the ALLOW policies match the request, allow the request. Deny the
// request."), its allow-nothing / deny-all / allow-all examples, and its
// matching of principals, namespaces, ipBlocks and ports with not- fields.

const (
	sleep    = "spiffe://cluster.local/ns/foo/sa/sleep"
	other    = "spiffe://cluster.local/ns/bar/sa/other"
	foreign  = "spiffe://other.td/ns/foo/sa/sleep"
	nonIstio = "spiffe://cluster.local/workload/x"
)

func exact(s string) config.StringMatch { return pattern(s) }

func pattern(s string) config.StringMatch {
	m, err := istioval.Pattern(s)
	if err != nil {
		panic(err)
	}
	return m
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// one builds a policy with a single rule made of the given clauses.
func one(name string, action config.Action, clauses ...config.Clause) *config.AuthorizationPolicy {
	return &config.AuthorizationPolicy{Name: name, Namespace: "foo", Scope: config.ScopeNamespace, Action: action,
		Rules: []config.Rule{clauses}}
}

func conn(id, src string, dstPort uint16) Conn {
	return Conn{SrcIdentity: id, SrcIP: netip.MustParseAddr(src), DstIP: netip.MustParseAddr("198.18.1.20"), DstPort: dstPort}
}

func build(t *testing.T, policies []*config.AuthorizationPolicy, peer []*config.PeerAuthentication, dst *config.Workload) *config.Snapshot {
	t.Helper()
	others := []*config.Workload{dst}
	s, err := config.NewSnapshot(config.Config{Workloads: others, Policies: policies, PeerAuthentications: peer}, config.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func dstWorkload() *config.Workload {
	return &config.Workload{UID: "httpbin", Name: "httpbin", Namespace: "foo", ServiceAccount: "httpbin",
		WorkloadIPs: []netip.Addr{netip.MustParseAddr("198.18.1.20")}, Protocol: config.ProtocolHBONE}
}

func TestAuthorize(t *testing.T) {
	allowSleep := one("allow-sleep", config.ActionAllow, config.Clause{{Principals: []config.StringMatch{exact("cluster.local/ns/foo/sa/sleep")}}})
	denyBar := one("deny-bar", config.ActionDeny, config.Clause{{Namespaces: []config.StringMatch{exact("bar")}}})
	allowNothing := &config.AuthorizationPolicy{Name: "allow-nothing", Namespace: "foo", Scope: config.ScopeNamespace, Action: config.ActionAllow}
	allowAll := &config.AuthorizationPolicy{Name: "allow-all", Namespace: "foo", Scope: config.ScopeNamespace, Action: config.ActionAllow, Rules: []config.Rule{{}}}
	denyAll := &config.AuthorizationPolicy{Name: "deny-all", Namespace: "foo", Scope: config.ScopeNamespace, Action: config.ActionDeny, Rules: []config.Rule{{}}}

	type tc struct {
		name     string
		policies []*config.AuthorizationPolicy
		conn     Conn
		allowed  bool
		reason   Reason
		policy   string
	}
	cases := []tc{
		{"no policy allows", nil, conn(sleep, "198.18.1.10", 8080), true, ReasonNoAllowPolicy, ""},
		{"no policy allows plaintext", nil, conn("", "198.18.1.10", 8080), true, ReasonNoAllowPolicy, ""},
		{"allow matches", []*config.AuthorizationPolicy{allowSleep}, conn(sleep, "198.18.1.10", 8080), true, ReasonAllowMatched, "foo/allow-sleep"},
		{"allow exists, no match", []*config.AuthorizationPolicy{allowSleep}, conn(other, "198.18.1.10", 8080), false, ReasonNoAllowMatched, ""},
		{"allow exists, plaintext", []*config.AuthorizationPolicy{allowSleep}, conn("", "198.18.1.10", 8080), false, ReasonNoAllowMatched, ""},
		{"other trust domain is another principal", []*config.AuthorizationPolicy{allowSleep}, conn(foreign, "198.18.1.10", 8080), false, ReasonNoAllowMatched, ""},
		{"deny beats allow", []*config.AuthorizationPolicy{allowAll, denyBar}, conn(other, "198.18.1.10", 8080), false, ReasonDenyMatched, "foo/deny-bar"},
		{"deny not matching, no allow", []*config.AuthorizationPolicy{denyBar}, conn(sleep, "198.18.1.10", 8080), true, ReasonNoAllowPolicy, ""},
		{"deny namespace never matches plaintext", []*config.AuthorizationPolicy{denyBar}, conn("", "198.18.1.10", 8080), true, ReasonNoAllowPolicy, ""},
		{"allow-nothing denies", []*config.AuthorizationPolicy{allowNothing}, conn(sleep, "198.18.1.10", 8080), false, ReasonNoAllowMatched, ""},
		{"allow-all allows plaintext", []*config.AuthorizationPolicy{allowAll}, conn("", "198.18.1.10", 8080), true, ReasonAllowMatched, "foo/allow-all"},
		{"deny-all denies", []*config.AuthorizationPolicy{allowAll, denyAll}, conn(sleep, "198.18.1.10", 8080), false, ReasonDenyMatched, "foo/deny-all"},
		{"allow-nothing plus allow-sleep", []*config.AuthorizationPolicy{allowNothing, allowSleep}, conn(sleep, "198.18.1.10", 8080), true, ReasonAllowMatched, "foo/allow-sleep"},
	}

	// principals: exact, prefix*, *suffix, * (presence) and notPrincipals.
	for _, p := range []struct {
		pattern string
		id      string
		match   bool
	}{
		{"cluster.local/ns/foo/sa/sleep", sleep, true},
		{"cluster.local/ns/foo/*", sleep, true},
		{"cluster.local/ns/foo/*", other, false},
		{"*/sa/sleep", sleep, true},
		{"*/sa/sleep", other, false},
		{"*", other, true},
		{"*", nonIstio, true},
		{"*", "", false},
	} {
		pol := one("p", config.ActionAllow, config.Clause{{Principals: []config.StringMatch{pattern(p.pattern)}}})
		reason, key := ReasonNoAllowMatched, ""
		if p.match {
			reason, key = ReasonAllowMatched, "foo/p"
		}
		cases = append(cases, tc{"principal " + p.pattern + " vs " + p.id, []*config.AuthorizationPolicy{pol}, conn(p.id, "198.18.1.10", 80), p.match, reason, key})
	}
	denyPlain := one("deny-plaintext", config.ActionDeny, config.Clause{{NotPrincipals: []config.StringMatch{pattern("*")}}})
	cases = append(cases,
		tc{"notPrincipals * denies plaintext", []*config.AuthorizationPolicy{denyPlain}, conn("", "198.18.1.10", 80), false, ReasonDenyMatched, "foo/deny-plaintext"},
		tc{"notPrincipals * lets mTLS through", []*config.AuthorizationPolicy{denyPlain}, conn(sleep, "198.18.1.10", 80), true, ReasonNoAllowPolicy, ""},
	)

	// namespaces and notNamespaces.
	allowNotBar := one("not-bar", config.ActionAllow, config.Clause{{NotNamespaces: []config.StringMatch{exact("bar")}}})
	allowNsPrefix := one("ns-prefix", config.ActionAllow, config.Clause{{Namespaces: []config.StringMatch{exact("fo*")}}})
	cases = append(cases,
		tc{"notNamespaces excludes", []*config.AuthorizationPolicy{allowNotBar}, conn(other, "198.18.1.10", 80), false, ReasonNoAllowMatched, ""},
		tc{"notNamespaces admits others", []*config.AuthorizationPolicy{allowNotBar}, conn(sleep, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/not-bar"},
		tc{"notNamespaces admits plaintext (no namespace)", []*config.AuthorizationPolicy{allowNotBar}, conn("", "198.18.1.10", 80), true, ReasonAllowMatched, "foo/not-bar"},
		tc{"namespace prefix", []*config.AuthorizationPolicy{allowNsPrefix}, conn(sleep, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/ns-prefix"},
		tc{"namespace of a non-Istio SPIFFE ID is empty", []*config.AuthorizationPolicy{allowNsPrefix}, conn(nonIstio, "198.18.1.10", 80), false, ReasonNoAllowMatched, ""},
	)

	// serviceAccounts.
	allowSA := one("sa", config.ActionAllow, config.Clause{{ServiceAccounts: []config.ServiceAccountMatch{{Namespace: "foo", ServiceAccount: "sleep"}}}})
	cases = append(cases,
		tc{"service account matches", []*config.AuthorizationPolicy{allowSA}, conn(sleep, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/sa"},
		tc{"service account other", []*config.AuthorizationPolicy{allowSA}, conn(other, "198.18.1.10", 80), false, ReasonNoAllowMatched, ""},
	)

	// ipBlocks (sourceIps) and notIpBlocks, IPv4 and IPv6, mapped addresses.
	allowBlock := one("block", config.ActionAllow, config.Clause{{SourceIPs: prefixes("198.18.1.0/24", "2001:2::/48"), NotSourceIPs: prefixes("198.18.1.66/32")}})
	cases = append(cases,
		tc{"ipBlocks v4", []*config.AuthorizationPolicy{allowBlock}, conn("", "198.18.1.10", 80), true, ReasonAllowMatched, "foo/block"},
		tc{"ipBlocks v4-mapped", []*config.AuthorizationPolicy{allowBlock}, conn("", "::ffff:198.18.1.10", 80), true, ReasonAllowMatched, "foo/block"},
		tc{"ipBlocks v6", []*config.AuthorizationPolicy{allowBlock}, conn("", "2001:2::7", 80), true, ReasonAllowMatched, "foo/block"},
		tc{"ipBlocks outside", []*config.AuthorizationPolicy{allowBlock}, conn("", "198.19.0.1", 80), false, ReasonNoAllowMatched, ""},
		tc{"notIpBlocks carve-out", []*config.AuthorizationPolicy{allowBlock}, conn("", "198.18.1.66", 80), false, ReasonNoAllowMatched, ""},
	)

	// ports and notPorts, destination IPs.
	denyNot8080 := one("ports", config.ActionDeny, config.Clause{{NotDestinationPorts: []uint16{8080}}})
	allowPorts := one("allow-ports", config.ActionAllow, config.Clause{{DestinationPorts: []uint16{8080, 9090}}})
	allowDstIP := one("dst-ip", config.ActionAllow, config.Clause{{DestinationIPs: prefixes("198.18.1.20/32")}})
	cases = append(cases,
		tc{"notPorts deny other port", []*config.AuthorizationPolicy{denyNot8080}, conn(sleep, "198.18.1.10", 9999), false, ReasonDenyMatched, "foo/ports"},
		tc{"notPorts deny lets 8080", []*config.AuthorizationPolicy{denyNot8080}, conn(sleep, "198.18.1.10", 8080), true, ReasonNoAllowPolicy, ""},
		tc{"ports any of", []*config.AuthorizationPolicy{allowPorts}, conn(sleep, "198.18.1.10", 9090), true, ReasonAllowMatched, "foo/allow-ports"},
		tc{"ports none of", []*config.AuthorizationPolicy{allowPorts}, conn(sleep, "198.18.1.10", 80), false, ReasonNoAllowMatched, ""},
		tc{"destination ip", []*config.AuthorizationPolicy{allowDstIP}, conn(sleep, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/dst-ip"},
	)

	// Structure: fields of one source AND, sources of one from OR, from AND to, rules OR.
	andFields := one("and", config.ActionAllow, config.Clause{{Namespaces: []config.StringMatch{exact("foo")}, SourceIPs: prefixes("198.18.1.0/24")}})
	orSources := one("or", config.ActionAllow, config.Clause{
		{Principals: []config.StringMatch{exact("cluster.local/ns/foo/sa/sleep")}},
		{Namespaces: []config.StringMatch{exact("bar")}},
	})
	fromAndTo := one("from-to", config.ActionAllow,
		config.Clause{{Namespaces: []config.StringMatch{exact("foo")}}},
		config.Clause{{DestinationPorts: []uint16{8080}}},
	)
	twoRules := &config.AuthorizationPolicy{Name: "rules", Namespace: "foo", Scope: config.ScopeNamespace, Action: config.ActionAllow,
		Rules: []config.Rule{
			{{{DestinationPorts: []uint16{1}}}},
			{{{Namespaces: []config.StringMatch{exact("bar")}}}},
		}}
	emptyMatch := one("empty-match", config.ActionAllow, config.Clause{{}})
	cases = append(cases,
		tc{"fields AND: both", []*config.AuthorizationPolicy{andFields}, conn(sleep, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/and"},
		tc{"fields AND: one fails", []*config.AuthorizationPolicy{andFields}, conn(sleep, "198.18.2.10", 80), false, ReasonNoAllowMatched, ""},
		tc{"sources OR: first", []*config.AuthorizationPolicy{orSources}, conn(sleep, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/or"},
		tc{"sources OR: second", []*config.AuthorizationPolicy{orSources}, conn(other, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/or"},
		tc{"from AND to: both", []*config.AuthorizationPolicy{fromAndTo}, conn(sleep, "198.18.1.10", 8080), true, ReasonAllowMatched, "foo/from-to"},
		tc{"from AND to: wrong port", []*config.AuthorizationPolicy{fromAndTo}, conn(sleep, "198.18.1.10", 80), false, ReasonNoAllowMatched, ""},
		tc{"rules OR", []*config.AuthorizationPolicy{twoRules}, conn(other, "198.18.1.10", 80), true, ReasonAllowMatched, "foo/rules"},
		tc{"an empty match matches nothing", []*config.AuthorizationPolicy{emptyMatch}, conn(sleep, "198.18.1.10", 80), false, ReasonNoAllowMatched, ""},
	)

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst := dstWorkload()
			s := build(t, c.policies, nil, dst)
			w, _ := s.WorkloadByUID(dst.UID)
			d := Authorize(s, w, c.conn)
			if d.Allowed != c.allowed || d.Reason != c.reason || d.PolicyKey() != c.policy {
				t.Errorf("got %s, want allowed=%v %s %s", d, c.allowed, c.reason, c.policy)
			}
		})
	}
}

func TestAuthorizeScopes(t *testing.T) {
	denyAll := func(name, ns string, scope config.Scope) *config.AuthorizationPolicy {
		return &config.AuthorizationPolicy{Name: name, Namespace: ns, Scope: scope, Action: config.ActionDeny, Rules: []config.Rule{{}}}
	}
	cases := []struct {
		name    string
		policy  *config.AuthorizationPolicy
		selects bool // the destination lists the policy
		denied  bool
	}{
		{"namespace policy of the destination's namespace", denyAll("p", "foo", config.ScopeNamespace), false, true},
		{"namespace policy of another namespace", denyAll("p", "bar", config.ScopeNamespace), false, false},
		{"global policy", denyAll("p", "istio-system", config.ScopeGlobal), false, true},
		{"selector policy selecting the destination", denyAll("p", "foo", config.ScopeWorkloadSelector), true, true},
		{"selector policy not selecting it", denyAll("p", "foo", config.ScopeWorkloadSelector), false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst := dstWorkload()
			if c.selects {
				dst.AuthorizationPolicies = []string{c.policy.Key()}
			}
			s := build(t, []*config.AuthorizationPolicy{c.policy}, nil, dst)
			w, _ := s.WorkloadByUID(dst.UID)
			if d := Authorize(s, w, conn(sleep, "198.18.1.10", 80)); d.Allowed == c.denied {
				t.Errorf("got %s, want denied=%v", d, c.denied)
			}
		})
	}
}

func TestAuthorizeDryRun(t *testing.T) {
	dryDeny := &config.AuthorizationPolicy{Name: "dry-deny", Namespace: "foo", Scope: config.ScopeNamespace, Action: config.ActionDeny, Rules: []config.Rule{{}}, DryRun: true}
	dryAllow := &config.AuthorizationPolicy{Name: "dry-allow", Namespace: "foo", Scope: config.ScopeNamespace, Action: config.ActionAllow,
		Rules: []config.Rule{{{{DestinationPorts: []uint16{1}}}}}, DryRun: true}
	dst := dstWorkload()
	s := build(t, []*config.AuthorizationPolicy{dryDeny, dryAllow}, nil, dst)
	w, _ := s.WorkloadByUID(dst.UID)
	d := Authorize(s, w, conn(sleep, "198.18.1.10", 80))
	if !d.Allowed || d.Reason != ReasonNoAllowPolicy {
		t.Errorf("dry-run policies decided: %s", d)
	}
	if len(d.DryRun) != 1 || d.DryRun[0].Name != "dry-deny" {
		t.Errorf("dry-run matches = %v", d.DryRun)
	}
}

func TestAuthorizePeerAuthentication(t *testing.T) {
	strictNS := []*config.PeerAuthentication{{Name: "strict", Namespace: "foo", Scope: config.ScopeNamespace, Mode: config.MTLSStrict}}
	cases := []struct {
		name     string
		peer     []*config.PeerAuthentication
		override config.MTLSMode
		id       string
		allowed  bool
		reason   Reason
	}{
		{"default permissive passes plaintext", nil, "", "", true, ReasonNoAllowPolicy},
		{"strict refuses plaintext", strictNS, "", "", false, ReasonStrictPlaintext},
		{"strict passes mTLS", strictNS, "", sleep, true, ReasonNoAllowPolicy},
		{"workload permissive overrides namespace strict", strictNS, config.MTLSPermissive, "", true, ReasonNoAllowPolicy},
		{"mesh strict", []*config.PeerAuthentication{{Name: "m", Namespace: "istio-system", Scope: config.ScopeGlobal, Mode: config.MTLSStrict}}, "", "", false, ReasonStrictPlaintext},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst := dstWorkload()
			dst.MTLSMode = c.override
			s := build(t, nil, c.peer, dst)
			w, _ := s.WorkloadByUID(dst.UID)
			d := Authorize(s, w, conn(c.id, "198.18.1.10", 80))
			if d.Allowed != c.allowed || d.Reason != c.reason {
				t.Errorf("got %s, want allowed=%v %s", d, c.allowed, c.reason)
			}
		})
	}
}

func BenchmarkAuthorize(b *testing.B) {
	dst := dstWorkload()
	var ps []*config.AuthorizationPolicy
	for i := range 20 {
		ps = append(ps, one("p"+string(rune('a'+i)), config.ActionAllow, config.Clause{{
			Principals: []config.StringMatch{exact("cluster.local/ns/x/sa/*")},
			SourceIPs:  prefixes("198.18.0.0/16"),
		}}))
	}
	ps = append(ps, one("last", config.ActionAllow, config.Clause{{Namespaces: []config.StringMatch{exact("foo")}}}))
	s, err := config.NewSnapshot(config.Config{Workloads: []*config.Workload{dst}, Policies: ps}, config.Options{})
	if err != nil {
		b.Fatal(err)
	}
	w, _ := s.WorkloadByUID(dst.UID)
	c := conn(sleep, "198.18.1.10", 8080)
	b.ReportAllocs()
	for b.Loop() {
		if !Authorize(s, w, c).Allowed {
			b.Fatal("denied")
		}
	}
}
