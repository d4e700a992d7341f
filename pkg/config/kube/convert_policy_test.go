package kube

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	securityapi "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/policy"
)

// Fail-closed conversion: every field and L4 `when` key, with valid,
// invalid and mixed values, as ALLOW and as DENY, decided by pkg/policy for
// two peers. The valid values are written to match the peer "good" only.
//
//	good:  spiffe://cluster.local/ns/good/sa/good from 198.18.5.5 to 198.19.1.10:8080
//	other: spiffe://cluster.local/ns/other/sa/other from 198.18.9.9 to 198.19.1.11:9090

var (
	peerGood = policy.Conn{SrcIdentity: "spiffe://cluster.local/ns/good/sa/good", SrcIP: netip.MustParseAddr("198.18.5.5"),
		DstIP: netip.MustParseAddr("198.19.1.10"), DstPort: 8080}
	peerOther = policy.Conn{SrcIdentity: "spiffe://cluster.local/ns/other/sa/other", SrcIP: netip.MustParseAddr("198.18.9.9"),
		DstIP: netip.MustParseAddr("198.19.1.11"), DstPort: 9090}
)

// fieldCase builds a rule from values of one field.
type fieldCase struct {
	field          string
	valid, invalid []string
	rule           func(values []string) *securityapi.Rule
}

func from(f func(s *securityapi.Source, v []string)) func([]string) *securityapi.Rule {
	return func(v []string) *securityapi.Rule {
		s := &securityapi.Source{}
		f(s, v)
		return &securityapi.Rule{From: []*securityapi.Rule_From{{Source: s}}}
	}
}

func to(f func(o *securityapi.Operation, v []string)) func([]string) *securityapi.Rule {
	return func(v []string) *securityapi.Rule {
		o := &securityapi.Operation{}
		f(o, v)
		return &securityapi.Rule{To: []*securityapi.Rule_To{{Operation: o}}}
	}
}

func when(key string, not bool) func([]string) *securityapi.Rule {
	return func(v []string) *securityapi.Rule {
		c := &securityapi.Condition{Key: key, Values: v}
		if not {
			c = &securityapi.Condition{Key: key, NotValues: v}
		}
		return &securityapi.Rule{When: []*securityapi.Condition{c}}
	}
}

var fieldCases = []fieldCase{
	{"principals", []string{"cluster.local/ns/good/sa/good"}, []string{"cluster.local/ns/*/sa/good"},
		from(func(s *securityapi.Source, v []string) { s.Principals = v })},
	{"principals (spiffe:// prefix)", []string{"spiffe://cluster.local/ns/good/*"}, []string{""},
		from(func(s *securityapi.Source, v []string) { s.Principals = v })},
	{"notPrincipals", []string{"*/sa/other"}, []string{"**"},
		from(func(s *securityapi.Source, v []string) { s.NotPrincipals = v })},
	{"namespaces", []string{"go*"}, []string{"g*d"},
		from(func(s *securityapi.Source, v []string) { s.Namespaces = v })},
	{"notNamespaces", []string{"other"}, []string{""},
		from(func(s *securityapi.Source, v []string) { s.NotNamespaces = v })},
	{"serviceAccounts", []string{"good/good"}, []string{"no-slash"},
		from(func(s *securityapi.Source, v []string) { s.ServiceAccounts = v })},
	{"notServiceAccounts", []string{"other/other"}, []string{"other/*"},
		from(func(s *securityapi.Source, v []string) { s.NotServiceAccounts = v })},
	{"ipBlocks", []string{"198.18.5.0/24"}, []string{"10.0.0.0/33"},
		from(func(s *securityapi.Source, v []string) { s.IpBlocks = v })},
	{"notIpBlocks", []string{"198.18.9.9"}, []string{"198.18.9"},
		from(func(s *securityapi.Source, v []string) { s.NotIpBlocks = v })},
	{"ports", []string{"8080"}, []string{"http"},
		to(func(o *securityapi.Operation, v []string) { o.Ports = v })},
	{"notPorts", []string{"9090"}, []string{"0"},
		to(func(o *securityapi.Operation, v []string) { o.NotPorts = v })},
	{"when source.ip", []string{"198.18.5.5/32"}, []string{"198.18.5.5/40"}, when("source.ip", false)},
	{"when source.ip notValues", []string{"198.18.9.0/24"}, []string{"x"}, when("source.ip", true)},
	{"when source.namespace", []string{"good"}, []string{"g**"}, when("source.namespace", false)},
	{"when source.namespace notValues", []string{"oth*"}, []string{""}, when("source.namespace", true)},
	{"when source.principal", []string{"*/ns/good/sa/good"}, []string{"a*b*"}, when("source.principal", false)},
	{"when source.principal notValues", []string{"cluster.local/ns/other/sa/other"}, []string{"*x*"}, when("source.principal", true)},
	{"when destination.ip", []string{"198.19.1.10"}, []string{"198.19.1.10/33"}, when("destination.ip", false)},
	{"when destination.ip notValues", []string{"198.19.1.11/32"}, []string{"2001:2::/129"}, when("destination.ip", true)},
	{"when destination.port", []string{"8080"}, []string{"65536"}, when("destination.port", false)},
	{"when destination.port notValues", []string{"9090"}, []string{"https"}, when("destination.port", true)},
}

// decide converts one policy and decides both peers against a workload it
// applies to.
func decide(t *testing.T, action securityapi.AuthorizationPolicy_Action, rules ...*securityapi.Rule) (good, other policy.Decision, ap *config.AuthorizationPolicy) {
	t.Helper()
	p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "p"}}
	p.Spec.Action, p.Spec.Rules = action, rules
	out := convert(Inputs{Policies: []*securityv1.AuthorizationPolicy{p}}, testOpts())
	if len(out.cfg.Policies) != 1 {
		t.Fatalf("converted %d policies, skipped %v", len(out.cfg.Policies), out.skipped)
	}
	ap = out.cfg.Policies[0]
	src := fixedSource{ap}
	dst := &config.Workload{UID: "dst", Namespace: "a"}
	return policy.Authorize(src, dst, peerGood), policy.Authorize(src, dst, peerOther), ap
}

type fixedSource struct{ p *config.AuthorizationPolicy }

func (f fixedSource) PoliciesFor(*config.Workload) []*config.AuthorizationPolicy {
	return []*config.AuthorizationPolicy{f.p}
}
func (fixedSource) MTLSMode(*config.Workload) config.MTLSMode { return config.MTLSPermissive }

func TestPolicyValuesFailClosed(t *testing.T) {
	type want struct{ good, other bool }
	for _, fc := range fieldCases {
		for _, tc := range []struct {
			values  string
			action  securityapi.AuthorizationPolicy_Action
			want    want
			invalid bool
		}{
			// ALLOW: a valid rule lets good in; an unreadable one lets nobody in.
			{"valid", securityapi.AuthorizationPolicy_ALLOW, want{true, false}, false},
			{"invalid", securityapi.AuthorizationPolicy_ALLOW, want{false, false}, true},
			{"mixed", securityapi.AuthorizationPolicy_ALLOW, want{false, false}, true},
			// DENY: a valid rule keeps good out; an unreadable one keeps everyone out.
			{"valid", securityapi.AuthorizationPolicy_DENY, want{false, true}, false},
			{"invalid", securityapi.AuthorizationPolicy_DENY, want{false, false}, true},
			{"mixed", securityapi.AuthorizationPolicy_DENY, want{false, false}, true},
		} {
			t.Run(fmt.Sprintf("%s/%s/%s", fc.field, tc.action, tc.values), func(t *testing.T) {
				values := map[string][]string{"valid": fc.valid, "invalid": fc.invalid,
					"mixed": append(append([]string{}, fc.valid...), fc.invalid...)}[tc.values]
				good, other, ap := decide(t, tc.action, fc.rule(values))
				if good.Allowed != tc.want.good || other.Allowed != tc.want.other {
					t.Errorf("good %v, other %v; want allowed good=%v other=%v (policy %+v)", good, other, tc.want.good, tc.want.other, ap)
				}
				if got := len(ap.Invalid) > 0; got != tc.invalid {
					t.Errorf("Invalid = %q, want invalid=%v", ap.Invalid, tc.invalid)
				}
				if tc.invalid && (len(ap.Rules) != 0 || !strings.Contains(ap.Invalid[0], "rules[0]")) {
					t.Errorf("an invalid rule must be reported and left out of Rules: %+v", ap)
				}
			})
		}
	}
}

// A bad rule spoils only itself: the policy's other rules still apply.
func TestInvalidRuleLeavesOtherRules(t *testing.T) {
	bad := &securityapi.Rule{From: []*securityapi.Rule_From{{Source: &securityapi.Source{IpBlocks: []string{"10.0.0.0/33"}}}}}
	goodNS := &securityapi.Rule{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Namespaces: []string{"good"}}}}}
	good, other, ap := decide(t, securityapi.AuthorizationPolicy_ALLOW, bad, goodNS)
	if !good.Allowed || other.Allowed || len(ap.Rules) != 1 || len(ap.Invalid) != 1 || !strings.HasPrefix(ap.Invalid[0], "rules[0]: from[0].source: ipBlocks[0]: ip block") {
		t.Errorf("good %v other %v policy %+v", good, other, ap)
	}
}

// Structural errors fail closed too: an empty source, operation or
// condition (Istio's webhook rejects them) would otherwise be a rule
// without conditions.
func TestEmptyClausesFailClosed(t *testing.T) {
	for name, r := range map[string]*securityapi.Rule{
		"nil source":       {From: []*securityapi.Rule_From{{}}},
		"empty source":     {From: []*securityapi.Rule_From{{Source: &securityapi.Source{}}}},
		"empty operation":  {To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{}}}},
		"condition values": {When: []*securityapi.Condition{{Key: "source.ip"}}},
	} {
		good, other, ap := decide(t, securityapi.AuthorizationPolicy_ALLOW, r)
		if good.Allowed || other.Allowed || len(ap.Invalid) != 1 {
			t.Errorf("%s: good %v other %v policy %+v", name, good, other, ap)
		}
	}
}

// L7 attributes are not errors: an ALLOW rule that needs them can never
// match at L4 (dropped, not reported), a DENY rule ignores them. remote.ip
// and remoteIpBlocks are L7, as istiod treats them for ztunnel.
func TestL7AttributesAreNotErrors(t *testing.T) {
	for name, r := range map[string]*securityapi.Rule{
		"requestPrincipals": {From: []*securityapi.Rule_From{{Source: &securityapi.Source{RequestPrincipals: []string{"*"}}}}},
		"remoteIpBlocks":    {From: []*securityapi.Rule_From{{Source: &securityapi.Source{RemoteIpBlocks: []string{"198.18.5.5"}}}}},
		"trustDomains":      {From: []*securityapi.Rule_From{{Source: &securityapi.Source{TrustDomains: []string{"cluster.local"}}}}},
		"methods":           {To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Methods: []string{"GET"}}}}},
		"paths":             {To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Paths: []string{"/x"}}}}},
		"hosts":             {To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Hosts: []string{"x"}}}}},
		"remote.ip":         {When: []*securityapi.Condition{{Key: "remote.ip", Values: []string{"198.18.5.5"}}}},
		"request.headers":   {When: []*securityapi.Condition{{Key: "request.headers[x]", Values: []string{"y"}}}},
		"unknown key":       {When: []*securityapi.Condition{{Key: "connection.sni", Values: []string{"y"}}}},
	} {
		good, other, ap := decide(t, securityapi.AuthorizationPolicy_ALLOW, r)
		if good.Allowed || other.Allowed || len(ap.Rules) != 0 || len(ap.Invalid) != 0 {
			t.Errorf("ALLOW %s: good %v other %v policy %+v", name, good, other, ap)
		}
		good, other, ap = decide(t, securityapi.AuthorizationPolicy_DENY, r)
		if good.Allowed || other.Allowed || len(ap.Rules) != 1 || len(ap.Invalid) != 0 {
			t.Errorf("DENY %s: good %v other %v policy %+v", name, good, other, ap)
		}
	}
}

// TestIstioFieldsClassified walks every field of Istio's AuthorizationPolicy,
// Rule, Source, Operation and Condition messages: each must be converted or
// deliberately classified as L7, so that a field a newer istio.io/api adds
// is never silently dropped (a set field the tables do not know fails its
// rule closed at run time; this test fails at build time first).
func TestIstioFieldsClassified(t *testing.T) {
	for name, tc := range map[string]struct {
		fields protoreflect.FieldDescriptors
		table  map[protoreflect.Name]fieldUse
	}{
		"AuthorizationPolicy": {(&securityapi.AuthorizationPolicy{}).ProtoReflect().Descriptor().Fields(), policyFields},
		"Rule":                {(&securityapi.Rule{}).ProtoReflect().Descriptor().Fields(), ruleFields},
		"Source":              {(&securityapi.Source{}).ProtoReflect().Descriptor().Fields(), sourceFields},
		"Operation":           {(&securityapi.Operation{}).ProtoReflect().Descriptor().Fields(), operationFields},
		"Condition":           {(&securityapi.Condition{}).ProtoReflect().Descriptor().Fields(), conditionFields},
	} {
		seen := map[protoreflect.Name]bool{}
		for i := range tc.fields.Len() {
			fd := tc.fields.Get(i)
			seen[fd.Name()] = true
			if tc.table[fd.Name()] == 0 {
				t.Errorf("%s.%s is neither converted nor classified as L7: add it to the table in convert.go", name, fd.Name())
			}
		}
		for f := range tc.table {
			if !seen[f] {
				t.Errorf("%s has no field %q: the table in convert.go names a field that does not exist", name, f)
			}
		}
	}
}

// A field set that the tables do not know (a newer Istio's) fails the
// rule closed at run time.
func TestUnknownFieldFailsClosed(t *testing.T) {
	saved := sourceFields["service_accounts"]
	delete(sourceFields, "service_accounts")
	defer func() { sourceFields["service_accounts"] = saved }()
	r := &securityapi.Rule{From: []*securityapi.Rule_From{{Source: &securityapi.Source{ServiceAccounts: []string{"good/good"}}}}}
	good, _, ap := decide(t, securityapi.AuthorizationPolicy_ALLOW, r)
	if good.Allowed || len(ap.Invalid) != 1 || !strings.Contains(ap.Invalid[0], "service_accounts") {
		t.Errorf("good %v policy %+v", good, ap)
	}
}
