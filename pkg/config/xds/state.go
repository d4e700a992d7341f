package xds

import (
	"errors"
	"fmt"
	"slices"
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

// entry is one converted resource. Exactly one of workload, service and
// policy is set.
type entry struct {
	workload *config.Workload
	service  *config.Service
	policy   *config.AuthorizationPolicy
	notes    []string
}

// decode converts one resource of a response. An error rejects it.
func decode(typeURL, name string, res *anypb.Any) (*entry, error) {
	if res == nil {
		return nil, errors.New("no resource body")
	}
	if res.GetTypeUrl() != typeURL {
		return nil, fmt.Errorf("resource of type %s in a %s response", res.GetTypeUrl(), typeURL)
	}
	e := &entry{}
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

// held is a workload published otherwise than istiod sent it: without its
// references to services or policies not (yet) received, or — local to this
// node and in the mesh — with its network namespace or, until that is
// found, outside the mesh. The applied snapshot is the provider's state;
// held keeps only what it cannot say (what istiod sent for these few).
type held struct {
	sent    *config.Workload
	missing []string // refs (serviceRef, policyRef) left out
	waiting bool     // local mesh workload without a network namespace yet
}

// serviceRef and policyRef name a reference a workload may wait for.
func serviceRef(k config.NamespacedHostname) string { return "service " + k.String() }
func policyRef(key string) string                   { return "policy " + key }

// derive returns the version of w (as istiod sent it) to apply on top of s,
// and what to hold about it (nil: applied as sent). References to services
// and policies s does not hold, or that gone names (removed by the same
// push), are left out, as ztunnel ignores them; a local mesh workload gets
// its network namespace from found or, until it is found, is published
// outside the mesh (others tunnel to its 15008, refused until it is).
// O(references of w).
func derive(w *config.Workload, s *config.Snapshot, gone map[string]bool, node string, found map[string]Netns) (*config.Workload, *held) {
	var missing []string
	for k := range w.Services {
		if _, ok := s.ServiceByKey(k); !ok || (len(gone) > 0 && gone[serviceRef(k)]) {
			missing = append(missing, serviceRef(k))
		}
	}
	for _, k := range w.AuthorizationPolicies {
		if p, ok := s.Policy(k); !ok || p.Scope != config.ScopeWorkloadSelector || (len(gone) > 0 && gone[policyRef(k)]) {
			missing = append(missing, policyRef(k))
		}
	}
	isLocal := node != "" && w.Node == node && w.InMesh()
	if len(missing) == 0 && !isLocal {
		return w, nil
	}
	h := &held{sent: w, missing: missing}
	c := *w
	if len(missing) > 0 {
		c.Services = map[config.NamespacedHostname]config.PortMap{}
		for k, v := range w.Services {
			if !slices.Contains(missing, serviceRef(k)) {
				c.Services[k] = v
			}
		}
		c.AuthorizationPolicies = slices.DeleteFunc(slices.Clone(w.AuthorizationPolicies), func(k string) bool {
			return slices.Contains(missing, policyRef(k))
		})
	}
	if isLocal {
		if ns, ok := found[w.UID]; ok {
			c.SetNetnsPath(ns.Path) // the cgroup is informational, as in the Kubernetes provider
		} else {
			c.Protocol = config.ProtocolTCP
			h.waiting = true
		}
	}
	return &c, h
}

// holds is the provider's bookkeeping of held workloads: O(held), which is
// this node's mesh workloads plus those waiting for a reference.
type holds struct {
	byUID map[string]*held
	// waitRef maps a ref to the UIDs of the held workloads that miss it.
	waitRef map[string]map[string]bool
}

func newHolds() holds {
	return holds{byUID: map[string]*held{}, waitRef: map[string]map[string]bool{}}
}

// sent returns w as istiod sent it (w is the applied version).
func (hs *holds) sent(w *config.Workload) *config.Workload {
	if h := hs.byUID[w.UID]; h != nil {
		return h.sent
	}
	return w
}

func (hs *holds) unhold(uid string) {
	h := hs.byUID[uid]
	if h == nil {
		return
	}
	for _, ref := range h.missing {
		if m := hs.waitRef[ref]; m != nil {
			delete(m, uid)
			if len(m) == 0 {
				delete(hs.waitRef, ref)
			}
		}
	}
	delete(hs.byUID, uid)
}

func (hs *holds) hold(uid string, h *held) {
	hs.byUID[uid] = h
	for _, ref := range h.missing {
		m := hs.waitRef[ref]
		if m == nil {
			m = map[string]bool{}
			hs.waitRef[ref] = m
		}
		m[uid] = true
	}
}

// waiters returns, as sent, the held workloads that miss ref.
func (hs *holds) waiters(ref string) []*config.Workload {
	var ws []*config.Workload
	for uid := range hs.waitRef[ref] {
		ws = append(ws, hs.byUID[uid].sent)
	}
	return ws
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
