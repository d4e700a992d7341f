// Package localfile is the configuration provider that reads one YAML file in
// the shape of Istio ztunnel's LOCAL_XDS_PATH file, extended for hosts
// without Kubernetes, and republishes it whenever it changes.
//
// # File shape
//
// Top-level keys `workloads`, `services` and `policies` with camelCase keys
// exactly as ztunnel's local config (github.com/istio/ztunnel at
// 62d826530e5c: src/xds.rs LocalConfig and LocalWorkload, src/state/workload.rs,
// src/state/service.rs, src/rbac.rs, examples/localhost.yaml), plus warren's
// extensions: a workload's `netnsPath` (required on this node), `cgroupPath`
// and `mtlsMode`, and a top-level `peerAuthentications` list. See
// examples/local-config.yaml for a commented file.
//
// Principals and namespaces in policy matches take either ztunnel's tagged
// form (`{Exact: x}`, `{Prefix: x}`, `{Suffix: x}`, `{Presence: {}}`) or
// Istio's pattern strings ("x", "x*", "*x", "*"). Principals are SPIFFE IDs
// without "spiffe://" (as in Istio: "cluster.local/ns/a/sa/b"); a leading
// "spiffe://" is accepted and removed. Enumerations (protocol, status,
// scope, action, mode) are matched case-insensitively: "ALLOW" and "Allow"
// are the same.
//
// Decoding is strict: an unknown key fails with its full path, e.g.
// `workloads[1].servicAccount: unknown field (did you mean "serviceAccount"?)`,
// duplicate keys fail with their line, and every value error names the item
// and field. Semantic checks (duplicate IPs and UIDs, dangling references,
// missing network namespaces) are [config.NewSnapshot]'s.
//
// # Watching
//
// The provider polls the file's metadata every second (Options.Interval) and
// re-reads it when mtime, size or inode change (and every tenth poll in any
// case, against coarse mtimes), then applies it only when its SHA-256
// differs from the last applied content. Polling was chosen over
// inotify (and fsnotify, not a dependency here) because editors and
// Kubernetes ConfigMaps replace files by rename or symlink swap, which an
// inotify watch on the file silently loses; one stat per second is cheap and
// needs no extra dependency. After a rejected file the provider retries every
// poll, so a fix elsewhere (a network namespace that appears) is picked up,
// and logs the error again only when it changes.
package localfile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"

	"go.yaml.in/yaml/v3"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/istioval"
)

// The file schema, used both to find unknown keys and to decode.
type file struct {
	Workloads           []workload           `json:"workloads"`
	Services            []service            `json:"services"`
	Policies            []policy             `json:"policies"`
	PeerAuthentications []peerAuthentication `json:"peerAuthentications"`
}

type workload struct {
	UID                   string                      `json:"uid"`
	Name                  string                      `json:"name"`
	Namespace             string                      `json:"namespace"`
	TrustDomain           string                      `json:"trustDomain"`
	ServiceAccount        string                      `json:"serviceAccount"`
	Network               string                      `json:"network"`
	WorkloadIPs           []string                    `json:"workloadIps"`
	Protocol              string                      `json:"protocol"`
	Node                  string                      `json:"node"`
	ClusterID             string                      `json:"clusterId"`
	WorkloadName          string                      `json:"workloadName"`
	WorkloadType          string                      `json:"workloadType"`
	CanonicalName         string                      `json:"canonicalName"`
	CanonicalRevision     string                      `json:"canonicalRevision"`
	Services              map[string]map[string]int64 `json:"services"`
	Capacity              *int64                      `json:"capacity"`
	Locality              locality                    `json:"locality"`
	Status                string                      `json:"status"`
	AuthorizationPolicies []string                    `json:"authorizationPolicies"`
	MTLSMode              string                      `json:"mtlsMode"`
	NetnsPath             string                      `json:"netnsPath"`
	CgroupPath            string                      `json:"cgroupPath"`
}

type locality struct {
	Region  string `json:"region"`
	Zone    string `json:"zone"`
	Subzone string `json:"subzone"`
}

type service struct {
	Name            string           `json:"name"`
	Namespace       string           `json:"namespace"`
	Hostname        string           `json:"hostname"`
	VIPs            []string         `json:"vips"`
	Ports           map[string]int64 `json:"ports"`
	SubjectAltNames []string         `json:"subjectAltNames"`
	// Canonical is accepted for compatibility with ztunnel files and ignored.
	Canonical bool `json:"canonical"`
}

type policy struct {
	Name      string      `json:"name"`
	Namespace string      `json:"namespace"`
	Scope     string      `json:"scope"`
	Action    string      `json:"action"`
	Rules     [][][]match `json:"rules"`
	DryRun    bool        `json:"dryRun"`
}

type match struct {
	Namespaces          []any            `json:"namespaces"`
	NotNamespaces       []any            `json:"notNamespaces"`
	ServiceAccounts     []serviceAccount `json:"serviceAccounts"`
	NotServiceAccounts  []serviceAccount `json:"notServiceAccounts"`
	Principals          []any            `json:"principals"`
	NotPrincipals       []any            `json:"notPrincipals"`
	SourceIPs           []string         `json:"sourceIps"`
	NotSourceIPs        []string         `json:"notSourceIps"`
	DestinationIPs      []string         `json:"destinationIps"`
	NotDestinationIPs   []string         `json:"notDestinationIps"`
	DestinationPorts    []int64          `json:"destinationPorts"`
	NotDestinationPorts []int64          `json:"notDestinationPorts"`
}

type serviceAccount struct {
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount"`
}

type peerAuthentication struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	Scope     string `json:"scope"`
	Mode      string `json:"mode"`
}

// Parse decodes a configuration file strictly and validates it into a
// snapshot for opts.Node. The error lists every problem found.
func Parse(data []byte, opts config.Options) (*config.Snapshot, error) {
	c, err := Decode(data)
	if err != nil {
		return nil, err
	}
	return config.NewSnapshot(c, opts)
}

// Decode turns a configuration file into a config.Config without the
// semantic checks of config.NewSnapshot.
//
// A file in block style (top-level keys at column 0, each a block list or
// a one-line value, as every example and generator writes them) is decoded
// one list item at a time: the item's text is parsed, checked for unknown
// keys and decoded into the schema struct, then dropped, so memory holds
// the file, one item's YAML tree and the Config, never a tree of the whole
// file (a 100,000-workload file would need gigabytes). Any other file, or
// a block-style file whose items do not parse on their own (an alias to an
// anchor in another item), is decoded as one tree, as before.
func Decode(data []byte) (config.Config, error) {
	if top, ok := splitTop(data); ok {
		if c, err, ok := decodeItems(top); ok {
			return c, err
		}
	}
	return decodeTree(data)
}

// decodeTree decodes the file as one YAML tree.
func decodeTree(data []byte) (config.Config, error) {
	tree, lines, err := parseYAML(data)
	if err != nil {
		return config.Config{}, err
	}
	if tree == nil {
		return config.Config{}, nil
	}
	top, ok := tree.(map[string]any)
	if !ok {
		return config.Config{}, errors.New("decode: the top level must be a map with workloads, services and policies")
	}
	var errs []error
	unknownFields(tree, reflect.TypeFor[file](), "", lines, &errs)
	if len(errs) > 0 {
		return config.Config{}, errors.Join(errs...)
	}
	for _, k := range sortedKeys(top) {
		if _, isList := top[k].([]any); !isList && top[k] != nil {
			errs = append(errs, fmt.Errorf("%s%s: want a list", lineOf(lines, k), k))
		}
	}
	if len(errs) > 0 {
		return config.Config{}, errors.Join(errs...)
	}
	d := &decoder{lines: lines}
	var c config.Config
	for _, key := range topKeys {
		for i, el := range items(top, key) {
			d.item(&c, key, i, el)
		}
	}
	if len(d.errs) > 0 {
		return config.Config{}, errors.Join(d.errs...)
	}
	return c, nil
}

// topKeys are the top-level lists, in the order they are decoded.
var topKeys = []string{"workloads", "services", "policies", "peerAuthentications"}

// item decodes element i of the top-level list key into c.
func (d *decoder) item(c *config.Config, key string, i int, el any) {
	path := key + "[" + strconv.Itoa(i) + "]"
	switch key {
	case "workloads":
		var w workload
		if d.decode(el, &w, path) {
			c.Workloads = append(c.Workloads, d.workload(i, &w))
		}
	case "services":
		var s service
		if d.decode(el, &s, path) {
			c.Services = append(c.Services, d.service(i, &s))
		}
	case "policies":
		var p policy
		if d.decode(el, &p, path) {
			c.Policies = append(c.Policies, d.policy(i, &p))
		}
	case "peerAuthentications":
		var pa peerAuthentication
		if d.decode(el, &pa, path) {
			c.PeerAuthentications = append(c.PeerAuthentications, &config.PeerAuthentication{
				Name: pa.Name, Namespace: pa.Namespace,
				Scope: enum(pa.Scope, config.ScopeNamespace, config.ScopeGlobal, config.ScopeNamespace),
				Mode:  enum(pa.Mode, "", config.MTLSStrict, config.MTLSPermissive),
			})
		}
	}
}

// items returns the list under key (checked to be a list), or nil.
func items(top map[string]any, key string) []any {
	v, _ := top[key].([]any)
	return v
}

type decoder struct {
	errs  []error
	lines map[string]int
}

func (d *decoder) addf(format string, args ...any) {
	d.errs = append(d.errs, fmt.Errorf(format, args...))
}

// decode converts one list element into its schema struct, reporting type
// errors with the element's path and line.
func (d *decoder) decode(el any, v any, path string) bool {
	js, err := json.Marshal(el)
	if err == nil {
		dec := json.NewDecoder(bytes.NewReader(js))
		dec.DisallowUnknownFields()
		err = dec.Decode(v)
	}
	if err == nil {
		return true
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		at := path
		if te.Field != "" {
			at = path + "." + te.Field
		}
		d.addf("%s%s: want %s, got %s", lineOf(d.lines, at, path), at, te.Type, te.Value)
	} else {
		d.addf("%s%s: %w", lineOf(d.lines, path), path, err)
	}
	return false
}

// lineOf returns "line N: " for the first known path, or "".
func lineOf(lines map[string]int, paths ...string) string {
	for _, p := range paths {
		if n, ok := lines[p]; ok {
			return fmt.Sprintf("line %d: ", n)
		}
	}
	return ""
}

// parseYAML decodes one YAML document into a JSON-like tree (maps with
// string keys, []any, string, int64, float64, bool, nil) and records the
// line of every path. It uses YAML 1.2 scalars (go.yaml.in/yaml/v3), so
// "no", "on" or "n" stay strings, and it rejects duplicate keys.
func parseYAML(data []byte) (any, map[string]int, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil, nil
		}
		return nil, nil, fmt.Errorf("decode yaml: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, nil, errors.New("decode yaml: the file must hold exactly one YAML document")
	}
	t := &treeBuilder{lines: map[string]int{}, budget: maxAliasNodes}
	tree, err := t.build(&doc, "", 0, false)
	if err != nil {
		return nil, nil, err
	}
	return tree, t.lines, nil
}

// maxAliasNodes bounds the nodes reached through aliases, so that aliases
// cannot expand a small file into an exponential one ("billion laughs").
// Only aliases multiply: every other node is a piece of the file's text,
// so their number is bounded by the file's size (a 100,000-workload file
// holds about 4 million), and limiting them would only reject big meshes.
// Real files use few aliases (shared port maps or rules): a million
// expanded nodes is far more than they need, and takes about a second.
const maxAliasNodes = 1 << 20

// treeBuilder turns yaml.Nodes into a JSON-like tree.
type treeBuilder struct {
	lines  map[string]int // path → line
	budget int            // nodes still allowed through aliases
	offset int            // added to node lines (an item parsed on its own)
}

// build converts n at path. Inside an alias expansion (aliased), paths and
// lines are not recorded: they would name the anchor's text, and building
// them would cost more than the expansion.
func (t *treeBuilder) build(n *yaml.Node, path string, depth int, aliased bool) (any, error) {
	line := n.Line + t.offset
	if depth > 64 {
		return nil, fmt.Errorf("line %d: %s: nesting too deep", line, path)
	}
	if aliased {
		if t.budget--; t.budget < 0 {
			return nil, fmt.Errorf("line %d: %s: document too large (more than %d nodes after alias expansion)", line, path, maxAliasNodes)
		}
	} else if path != "" {
		if _, seen := t.lines[path]; !seen {
			t.lines[path] = line
		}
	}
	switch n.Kind {
	case yaml.DocumentNode:
		if len(n.Content) == 0 {
			return nil, nil
		}
		return t.build(n.Content[0], path, depth+1, aliased)
	case yaml.AliasNode:
		return t.build(n.Alias, path, depth+1, true)
	case yaml.SequenceNode:
		out := make([]any, 0, len(n.Content))
		for i, c := range n.Content {
			at := path
			if !aliased {
				at = path + "[" + strconv.Itoa(i) + "]"
			}
			v, err := t.build(c, at, depth+1, aliased)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	case yaml.MappingNode:
		out := make(map[string]any, len(n.Content)/2)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Kind != yaml.ScalarNode {
				return nil, fmt.Errorf("line %d: %s: map keys must be scalars", k.Line+t.offset, path)
			}
			at := path
			if aliased {
				// keep the alias's path
			} else if path != "" {
				at = path + "." + k.Value
			} else {
				at = k.Value
			}
			if _, dup := out[k.Value]; dup {
				return nil, fmt.Errorf("line %d: %s: duplicate key %q", k.Line+t.offset, at, k.Value)
			}
			val, err := t.build(v, at, depth+1, aliased)
			if err != nil {
				return nil, err
			}
			out[k.Value] = val
		}
		return out, nil
	case yaml.ScalarNode:
		var err error
		switch n.ShortTag() {
		case "!!null":
			return nil, nil
		case "!!bool":
			var b bool
			if err = n.Decode(&b); err == nil {
				return b, nil
			}
		case "!!int":
			var i int64
			if err = n.Decode(&i); err == nil {
				return i, nil
			}
		case "!!float":
			var f float64
			if err = n.Decode(&f); err == nil {
				return f, nil
			}
		default:
			return n.Value, nil
		}
		return nil, fmt.Errorf("line %d: %s: %w", line, path, err)
	}
	return nil, fmt.Errorf("line %d: %s: unsupported YAML node", line, path)
}

func (d *decoder) workload(i int, w *workload) *config.Workload {
	where := fmt.Sprintf("workloads[%d] (uid %q)", i, w.UID)
	out := &config.Workload{
		UID: w.UID, Name: w.Name, Namespace: w.Namespace, TrustDomain: w.TrustDomain,
		ServiceAccount: w.ServiceAccount, Network: w.Network, Node: w.Node,
		Protocol:              enum(w.Protocol, config.ProtocolTCP, config.ProtocolHBONE, config.ProtocolTCP),
		Status:                enum(w.Status, config.Healthy, config.Healthy, config.Unhealthy),
		MTLSMode:              enum(w.MTLSMode, config.MTLSUnset, config.MTLSStrict, config.MTLSPermissive),
		AuthorizationPolicies: w.AuthorizationPolicies,
		Capacity:              1,
	}
	out.SetMeta(config.WorkloadMeta{ClusterID: w.ClusterID, WorkloadName: w.WorkloadName, WorkloadType: w.WorkloadType,
		CanonicalName: w.CanonicalName, CanonicalRevision: w.CanonicalRevision})
	out.SetLocality(config.Locality(w.Locality))
	out.SetPaths(w.NetnsPath, w.CgroupPath)
	if w.Capacity != nil {
		if *w.Capacity < 0 || *w.Capacity > 1<<32-1 {
			d.addf("%s: capacity: %d out of range", where, *w.Capacity)
		} else {
			out.Capacity = uint32(*w.Capacity)
		}
	}
	for j, s := range w.WorkloadIPs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			d.addf("%s: workloadIps[%d]: %w", where, j, err)
			continue
		}
		out.WorkloadIPs = append(out.WorkloadIPs, ip.Unmap())
	}
	if len(w.Services) > 0 {
		out.Services = make(map[config.NamespacedHostname]config.PortMap, len(w.Services))
	}
	for _, k := range sortedKeys(w.Services) {
		key, err := config.ParseNamespacedHostname(k)
		if err != nil {
			d.addf("%s: services: %w", where, err)
			continue
		}
		out.Services[key] = d.ports(w.Services[k], fmt.Sprintf("%s: services[%q]", where, k))
	}
	return out
}

func (d *decoder) service(i int, s *service) *config.Service {
	where := fmt.Sprintf("services[%d] (%s/%s)", i, s.Namespace, s.Hostname)
	out := &config.Service{
		Name: s.Name, Namespace: s.Namespace, Hostname: s.Hostname,
		SubjectAltNames: s.SubjectAltNames,
		Ports:           d.ports(s.Ports, where+": ports"),
	}
	for j, v := range s.VIPs {
		na, err := config.ParseNetworkAddress(v)
		if err != nil {
			d.addf("%s: vips[%d]: %w", where, j, err)
			continue
		}
		out.VIPs = append(out.VIPs, na)
	}
	return out
}

// ports converts a "service port" → target port map. A 0 target defers to
// the other side: a service's 0 to each endpoint's mapping, a workload's 0
// to the service's.
func (d *decoder) ports(in map[string]int64, where string) config.PortMap {
	out := make(config.PortMap, len(in))
	for _, k := range sortedKeys(in) {
		sp, err := strconv.ParseUint(k, 10, 16)
		if err != nil || sp == 0 {
			d.addf("%s: service port %q is not a port number (1-65535)", where, k)
			continue
		}
		tp := in[k]
		if tp < 0 || tp > 65535 {
			d.addf("%s[%s]: target port %d is not a port number", where, k, tp)
			continue
		}
		out[uint16(sp)] = uint16(tp)
	}
	return out
}

func (d *decoder) policy(i int, p *policy) *config.AuthorizationPolicy {
	where := fmt.Sprintf("policies[%d] (%s/%s)", i, p.Namespace, p.Name)
	out := &config.AuthorizationPolicy{
		Name: p.Name, Namespace: p.Namespace, DryRun: p.DryRun,
		Scope:  enum(p.Scope, "", config.ScopeGlobal, config.ScopeNamespace, config.ScopeWorkloadSelector),
		Action: enum(p.Action, config.ActionAllow, config.ActionAllow, config.ActionDeny),
	}
	for r, rule := range p.Rules {
		var cr config.Rule
		for c, clause := range rule {
			var cc config.Clause
			for m, mt := range clause {
				cc = append(cc, d.match(&mt, fmt.Sprintf("%s: rules[%d][%d][%d]", where, r, c, m)))
			}
			cr = append(cr, cc)
		}
		out.Rules = append(out.Rules, cr)
	}
	return out
}

func (d *decoder) match(m *match, where string) config.Match {
	return config.Match{
		Namespaces:          d.strings(m.Namespaces, where+".namespaces", false),
		NotNamespaces:       d.strings(m.NotNamespaces, where+".notNamespaces", false),
		ServiceAccounts:     d.serviceAccounts(m.ServiceAccounts, where+".serviceAccounts"),
		NotServiceAccounts:  d.serviceAccounts(m.NotServiceAccounts, where+".notServiceAccounts"),
		Principals:          d.strings(m.Principals, where+".principals", true),
		NotPrincipals:       d.strings(m.NotPrincipals, where+".notPrincipals", true),
		SourceIPs:           d.blocks(m.SourceIPs, where+".sourceIps"),
		NotSourceIPs:        d.blocks(m.NotSourceIPs, where+".notSourceIps"),
		DestinationIPs:      d.blocks(m.DestinationIPs, where+".destinationIps"),
		NotDestinationIPs:   d.blocks(m.NotDestinationIPs, where+".notDestinationIps"),
		DestinationPorts:    d.portList(m.DestinationPorts, where+".destinationPorts"),
		NotDestinationPorts: d.portList(m.NotDestinationPorts, where+".notDestinationPorts"),
	}
}

func (d *decoder) serviceAccounts(in []serviceAccount, where string) []config.ServiceAccountMatch {
	var out []config.ServiceAccountMatch
	for j, s := range in {
		m, err := istioval.ServiceAccountOf(s.Namespace, s.ServiceAccount)
		if err != nil {
			d.addf("%s[%d]: service account: %w", where, j, err)
			continue
		}
		out = append(out, m)
	}
	return out
}

// strings converts Istio patterns or ztunnel's tagged matches.
func (d *decoder) strings(in []any, where string, principal bool) []config.StringMatch {
	var out []config.StringMatch
	for j, v := range in {
		var sm config.StringMatch
		switch v := v.(type) {
		case string:
			var err error
			if sm, err = istioval.Pattern(v); err != nil {
				d.addf("%s[%d]: %w", where, j, err)
				continue
			}
		case map[string]any:
			if len(v) != 1 {
				d.addf("%s[%d]: want one of Exact, Prefix, Suffix or Presence, got %d keys", where, j, len(v))
				continue
			}
			for k, val := range v {
				kind := enum(k, "", config.MatchExact, config.MatchPrefix, config.MatchSuffix, config.MatchPresence)
				s, isString := val.(string)
				switch {
				case kind == config.MatchPresence:
					sm = config.StringMatch{Kind: kind}
				case kind == config.MatchExact || kind == config.MatchPrefix || kind == config.MatchSuffix:
					if !isString {
						d.addf("%s[%d].%s: want a string", where, j, k)
						continue
					}
					sm = config.StringMatch{Kind: kind, Value: s}
				default:
					d.addf("%s[%d]: unknown match %q (want Exact, Prefix, Suffix or Presence)", where, j, k)
					continue
				}
			}
			if sm.Kind == "" {
				continue
			}
		default:
			d.addf("%s[%d]: want a string or a {Exact|Prefix|Suffix|Presence: ...} map", where, j)
			continue
		}
		if principal {
			sm = istioval.TrimSpiffe(sm)
		}
		out = append(out, sm)
	}
	return out
}

// blocks parses CIDRs or single addresses (a /32 or /128), as Istio's ipBlocks.
func (d *decoder) blocks(in []string, where string) []netip.Prefix {
	var out []netip.Prefix
	for j, s := range in {
		p, err := istioval.IPBlock(s)
		if err != nil {
			d.addf("%s[%d]: %w", where, j, err)
			continue
		}
		out = append(out, p)
	}
	return out
}

func (d *decoder) portList(in []int64, where string) []uint16 {
	var out []uint16
	for j, n := range in {
		p, err := istioval.PortNumber(n)
		if err != nil {
			d.addf("%s[%d]: %w", where, j, err)
			continue
		}
		out = append(out, p)
	}
	return out
}

// enum maps s case-insensitively onto one of the allowed values; "" gives
// def; an unknown value is kept as written so that validation names it.
func enum[T ~string](s string, def T, allowed ...T) T {
	if s == "" {
		return def
	}
	for _, a := range allowed {
		if strings.EqualFold(s, string(a)) {
			return a
		}
	}
	return T(s)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// unknownFields walks a decoded JSON tree against the schema type and
// reports every key the schema does not know, with its full path.
func unknownFields(v any, t reflect.Type, path string, lines map[string]int, errs *[]error) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return // a type error, reported by decoding
		}
		fields := fieldsOf(t)
		for _, k := range sortedKeys(m) {
			at := k
			if path != "" {
				at = path + "." + k
			}
			ft, ok := fields[k]
			if !ok {
				*errs = append(*errs, fmt.Errorf("%s%s: unknown field%s", lineOf(lines, at), at, suggest(k, fields)))
				continue
			}
			unknownFields(m[k], ft, at, lines, errs)
		}
	case reflect.Slice:
		s, ok := v.([]any)
		if !ok {
			return
		}
		for i, e := range s {
			unknownFields(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i), lines, errs)
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			return
		}
		for _, k := range sortedKeys(m) {
			unknownFields(m[k], t.Elem(), path+"."+k, lines, errs)
		}
	}
}

// schemaFields caches fieldsOf: reflect.Type → map[string]reflect.Type.
var schemaFields sync.Map

// fieldsOf maps the JSON names of struct type t's fields to their types.
func fieldsOf(t reflect.Type) map[string]reflect.Type {
	if f, ok := schemaFields.Load(t); ok {
		return f.(map[string]reflect.Type)
	}
	fields := map[string]reflect.Type{}
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		fields[name] = f.Type
	}
	schemaFields.Store(t, fields)
	return fields
}

// suggest names the closest known field, if one is close.
func suggest(k string, fields map[string]reflect.Type) string {
	best, bestD := "", 3
	for f := range fields {
		if strings.EqualFold(f, k) {
			return fmt.Sprintf(" (did you mean %q?)", f)
		}
		if dist := editDistance(strings.ToLower(k), strings.ToLower(f)); dist < bestD || (dist == bestD && f < best) {
			best, bestD = f, dist
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
