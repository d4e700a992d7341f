package xds

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/warren-mesh/warren/pkg/config"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi"
	"github.com/warren-mesh/warren/pkg/config/xds/workloadapi/security"
)

// Type URLs of the resources warren subscribes to, as ztunnel does.
const (
	AddressType       = "type.googleapis.com/istio.workload.Address"
	AuthorizationType = "type.googleapis.com/istio.security.Authorization"
)

// entry is one converted resource, kept by its xDS name. Exactly one of
// workload, service and policy is set.
type entry struct {
	version  string
	workload *config.Workload
	service  *config.Service
	policy   *config.AuthorizationPolicy
	notes    []string
}

// state is every resource istiod has sent and warren applied, by type URL
// and name. It is rebuilt into a config.Config per push; resources are
// converted once, when they arrive.
type state struct {
	res map[string]map[string]*entry // type URL → name → entry
}

func newState() *state {
	return &state{res: map[string]map[string]*entry{AddressType: {}, AuthorizationType: {}}}
}

// clone copies the maps (not the entries, which are immutable).
func (s *state) clone() *state {
	c := &state{res: map[string]map[string]*entry{}}
	for t, m := range s.res {
		c.res[t] = maps.Clone(m)
	}
	return c
}

// change is one resource of a response: an upsert (e != nil) or a removal.
type change struct {
	typeURL, name string
	e             *entry
}

// decode converts one resource of a response. An error rejects it.
func decode(typeURL, name, version string, res *anypb.Any) (*entry, error) {
	if res == nil {
		return nil, errors.New("no resource body")
	}
	if res.GetTypeUrl() != typeURL {
		return nil, fmt.Errorf("resource of type %s in a %s response", res.GetTypeUrl(), typeURL)
	}
	e := &entry{version: version}
	switch typeURL {
	case AddressType:
		var a workloadapi.Address
		if err := proto.Unmarshal(res.GetValue(), &a); err != nil {
			return nil, fmt.Errorf("unmarshal: %w", err)
		}
		var err error
		switch t := a.GetType().(type) {
		case *workloadapi.Address_Workload:
			e.workload, e.notes, err = convertWorkload(t.Workload)
			if err == nil && e.workload.UID != name {
				err = fmt.Errorf("workload uid %q differs from the resource name", e.workload.UID)
			}
		case *workloadapi.Address_Service:
			e.service, e.notes, err = convertService(t.Service)
			if err == nil && e.service.Key().String() != name {
				err = fmt.Errorf("service %s differs from the resource name", e.service.Key())
			}
		default:
			err = errors.New("address is neither a workload nor a service")
		}
		if err != nil {
			return nil, err
		}
	case AuthorizationType:
		var a security.Authorization
		if err := proto.Unmarshal(res.GetValue(), &a); err != nil {
			return nil, fmt.Errorf("unmarshal: %w", err)
		}
		p, err := convertAuthorization(&a)
		if err != nil {
			return nil, err
		}
		if p.Key() != name {
			return nil, fmt.Errorf("authorization %s differs from the resource name", p.Key())
		}
		e.policy = p
	default:
		return nil, fmt.Errorf("type %s is not subscribed", typeURL)
	}
	return e, nil
}

// apply applies changes to s in place.
func (s *state) apply(changes []change) {
	for _, c := range changes {
		if c.e == nil {
			delete(s.res[c.typeURL], c.name)
		} else {
			s.res[c.typeURL][c.name] = c.e
		}
	}
}

// local resolves this node's mesh workloads' network namespaces: it returns
// the netns of the workloads it found; the others wait.
type local func(ws []*config.Workload) map[string]Netns

// built is a Config and what building it found.
type built struct {
	cfg      config.Config
	enrolled []string // local mesh workloads, "namespace/name"
	waiting  []string // local mesh workloads without a network namespace yet
	notes    []string // what was left out, by resource
}

// build assembles a Config from the state: O(resources), no conversion.
// References to services and policies istiod has not sent (yet) are
// dropped, as ztunnel ignores them; local mesh workloads get their network
// namespace or, until it is found, are published outside the mesh.
func (s *state) build(node string, resolve local) built {
	var b built
	policies := map[string]*config.AuthorizationPolicy{}
	for _, name := range sortedKeys(s.res[AuthorizationType]) {
		e := s.res[AuthorizationType][name]
		b.cfg.Policies = append(b.cfg.Policies, e.policy)
		policies[name] = e.policy
	}
	services := map[config.NamespacedHostname]bool{}
	addrs := s.res[AddressType]
	for _, name := range sortedKeys(addrs) {
		if e := addrs[name]; e.service != nil {
			b.cfg.Services = append(b.cfg.Services, e.service)
			services[e.service.Key()] = true
		}
	}
	var localMesh []*config.Workload
	for _, name := range sortedKeys(addrs) {
		e := addrs[name]
		for _, n := range e.notes {
			b.notes = append(b.notes, name+": "+n)
		}
		w := e.workload
		if w == nil {
			continue
		}
		if trimmed := trimRefs(w, services, policies); trimmed != w {
			b.notes = append(b.notes, name+": references to services or policies not (yet) received are ignored")
			w = trimmed
		}
		if node != "" && w.Node == node && w.InMesh() {
			localMesh = append(localMesh, w)
			continue
		}
		b.cfg.Workloads = append(b.cfg.Workloads, w)
	}
	var found map[string]Netns
	if len(localMesh) > 0 && resolve != nil {
		found = resolve(localMesh)
	}
	for _, w := range localMesh {
		key := w.Namespace + "/" + w.Name
		ns, ok := found[w.UID]
		c := *w
		if ok {
			c.NetnsPath = ns.Path // the cgroup is informational, as in the Kubernetes provider
			b.enrolled = append(b.enrolled, key)
		} else {
			// Not found yet: not captured, so not in the mesh on this
			// node (others tunnel to its 15008, refused until it is).
			c.Protocol = config.ProtocolTCP
			b.waiting = append(b.waiting, key)
		}
		b.cfg.Workloads = append(b.cfg.Workloads, &c)
	}
	return b
}

// trimRefs returns w, or a copy without the services and policies that
// are not defined.
func trimRefs(w *config.Workload, services map[config.NamespacedHostname]bool, policies map[string]*config.AuthorizationPolicy) *config.Workload {
	ok := true
	for k := range w.Services {
		if !services[k] {
			ok = false
		}
	}
	for _, k := range w.AuthorizationPolicies {
		if p := policies[k]; p == nil || p.Scope != config.ScopeWorkloadSelector {
			ok = false
		}
	}
	if ok {
		return w
	}
	c := *w
	c.Services = map[config.NamespacedHostname]config.PortMap{}
	for k, v := range w.Services {
		if services[k] {
			c.Services[k] = v
		}
	}
	c.AuthorizationPolicies = slices.DeleteFunc(slices.Clone(w.AuthorizationPolicies), func(k string) bool {
		p := policies[k]
		return p == nil || p.Scope != config.ScopeWorkloadSelector
	})
	return &c
}

func sortedKeys[V any](m map[string]V) []string {
	k := make([]string, 0, len(m))
	for n := range m {
		k = append(k, n)
	}
	sort.Strings(k)
	return k
}

// rejection is a resource that was not applied, and why.
type rejection struct{ typeURL, name, why string }

func (r rejection) String() string { return r.name + ": " + r.why }

// joinRejections is the NACK's error detail.
func joinRejections(rs []rejection) string {
	var b strings.Builder
	for i, r := range rs {
		if i > 0 {
			b.WriteString("; ")
		}
		if i == 10 {
			fmt.Fprintf(&b, "and %d more", len(rs)-i)
			break
		}
		b.WriteString(r.String())
	}
	return b.String()
}
