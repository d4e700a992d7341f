package config

import (
	"errors"
	"fmt"
	"slices"
)

// Delta is a set of changes to a snapshot, as an incremental (delta xDS)
// provider receives them. Upserts replace the item with the same key
// (workload UID, service namespace/hostname, policy namespace/name) or add
// it.
type Delta struct {
	Workloads        []*Workload
	RemovedWorkloads []string
	Services         []*Service
	RemovedServices  []NamespacedHostname
	Policies         []*AuthorizationPolicy
	RemovedPolicies  []string
	// PeerAuthentications replaces every peer authentication when
	// SetPeerAuthentications is true.
	PeerAuthentications    []*PeerAuthentication
	SetPeerAuthentications bool
}

// Len returns the number of items in the delta.
func (d *Delta) Len() int {
	n := len(d.Workloads) + len(d.RemovedWorkloads) + len(d.Services) + len(d.RemovedServices) +
		len(d.Policies) + len(d.RemovedPolicies)
	if d.SetPeerAuthentications {
		n++
	}
	return n
}

// Rejection is an item of a Delta that Apply left out, and why: its
// previous version (or its absence) stays.
type Rejection struct {
	// Kind is "workload", "service", "policy" or "peerAuthentications".
	Kind string
	// Key is the workload UID, "namespace/hostname" or "namespace/name".
	Key string
	Err error
}

// Error returns "kind key: reason".
func (r Rejection) Error() string { return r.Kind + " " + r.Key + ": " + r.Err.Error() }

// Unwrap returns the reason.
func (r Rejection) Unwrap() error { return r.Err }

// bulkWorkloads is the number of workloads from which Apply sizes the
// indexes' leaves for the whole delta first (see shardMap.reserve).
const bulkWorkloads = 1024

// Apply returns a new snapshot with d applied, leaving s unchanged, and the
// items it rejected. Each item is validated on its own against the state it
// lands in, with the checks of NewSnapshot (required fields, enumerations,
// duplicate UIDs and addresses, VIPs, references to services and
// policies, local network namespaces); an invalid item is rejected alone
// and the others are applied. Removing a service that workloads still
// back, or a policy that workloads still list, is rejected too.
//
// Items are applied in this order: workload removals, policy upserts,
// service upserts, workload upserts, service removals, policy removals,
// peer authentications; a swap of addresses between two workloads in one
// delta must therefore remove or move the first before the second claims
// its address, or take two deltas.
//
// The cost is O(items) lookups and shard copies (see shardMap), plus the
// rebuild of what the items invalidate: the endpoint list of each service
// a changed workload backs or backed, the workload list of each node it
// is or was on, this node's enrolled list when a local workload changes,
// and the scoped policy lists (O(policies)) when a policy changes. The
// result shares every unchanged shard with s.
func (s *Snapshot) Apply(d Delta) (*Snapshot, []Rejection) {
	n := *s
	n.lists = &lists{}
	n.thaw()
	a := applier{s: &n, nodes: map[string][]string{}, services: map[NamespacedHostname][]string{}, uids: map[string]bool{}}
	if len(d.Workloads) >= bulkWorkloads {
		n.reserveFor(d.Workloads) // a first push, or a large one
	}

	for _, uid := range d.RemovedWorkloads {
		if old, ok := n.byUID.get(uid); ok {
			n.dropWorkload(old)
			a.touch(old)
		}
	}

	policiesChanged := false
	for _, p := range d.Policies {
		if a.upsertPolicy(p) {
			policiesChanged = true
		}
	}
	for _, svc := range d.Services {
		a.upsertService(svc)
	}
	var netnsOwner map[string]string
	for _, w := range d.Workloads {
		if netnsOwner == nil && n.opts.Node != "" && w.Node == n.opts.Node {
			netnsOwner = a.localNetns()
		}
		a.upsertWorkload(w, netnsOwner)
	}
	for _, key := range d.RemovedServices {
		a.removeService(key)
	}
	for _, key := range d.RemovedPolicies {
		if a.removePolicy(key) {
			policiesChanged = true
		}
	}
	if d.SetPeerAuthentications {
		v := &validator{}
		global, byNS := checkPeerAuths(v, d.PeerAuthentications)
		if err := v.err(); err != nil {
			a.reject("peerAuthentications", "*", err)
		} else {
			n.peerAuths, n.mtlsGlobal, n.mtlsByNS = d.PeerAuthentications, global, byNS
		}
	}

	a.rebuild()
	if policiesChanged {
		n.rescope()
	}
	n.freeze()
	return &n, a.rejected
}

// applier is the state of one Apply: what it touched, what it rejected.
type applier struct {
	s *Snapshot
	// nodes and services whose lists to rebuild, with the UIDs of the
	// workloads that changed there (old or new version; maybe twice)
	nodes    map[string][]string
	services map[NamespacedHostname][]string
	uids     map[string]bool // workloads added, changed or removed
	rejected []Rejection
	// policiesOwned: s.policies is a copy this Apply may change in place.
	policiesOwned bool
}

func (a *applier) reject(kind, key string, err error) {
	a.rejected = append(a.rejected, Rejection{Kind: kind, Key: key, Err: err})
}

// touch records that w (an old or new version) changed.
func (a *applier) touch(w *Workload) {
	a.uids[w.UID] = true
	a.nodes[w.Node] = append(a.nodes[w.Node], w.UID)
	for key := range w.Services {
		a.services[key] = append(a.services[key], w.UID)
	}
}

// localNetns maps the network namespaces of this node's workloads to their UIDs.
func (a *applier) localNetns() map[string]string {
	owner := map[string]string{}
	for _, w := range a.s.LocalWorkloads() {
		if cur, ok := a.s.byUID.get(w.UID); ok && cur.NetnsPath() != "" {
			owner[cur.NetnsPath()] = cur.UID
		}
	}
	return owner
}

func (a *applier) upsertWorkload(in *Workload, netnsOwner map[string]string) {
	s := a.s
	if in.UID == "" {
		a.reject("workload", "", errors.New("uid is required"))
		return
	}
	old, _ := s.byUID.get(in.UID)
	v := &validator{}
	w := s.checkWorkload(v, loc{"workload", -1, in.UID, ""}, in, netnsOwner)
	if err := v.err(); err != nil {
		a.reject("workload", in.UID, err)
		return
	}
	s.putWorkload(old, w)
	if w.NetnsPath() != "" && netnsOwner != nil && s.isLocal(w) {
		netnsOwner[w.NetnsPath()] = w.UID
	}
	if old != nil {
		a.touch(old)
	}
	a.touch(w)
}

func (a *applier) upsertService(in *Service) {
	s := a.s
	key := in.Key()
	if in.Name == "" || in.Namespace == "" || in.Hostname == "" {
		a.reject("service", key.String(), errors.New("name, namespace and hostname are required"))
		return
	}
	v := &validator{}
	svc := s.checkService(v, loc{"service", -1, key.Namespace, key.Hostname}, in)
	if err := v.err(); err != nil {
		a.reject("service", key.String(), err)
		return
	}
	s.putService(svc)
	a.services[key] = append(a.services[key], "") // endpoints point at the new version
}

func (a *applier) removeService(key NamespacedHostname) {
	s := a.s
	svc, ok := s.svcByKey.get(key)
	if !ok {
		return
	}
	if eps, _ := s.endpoints.get(key); len(eps) > 0 && !a.allGone(key, eps) {
		a.reject("service", key.String(), fmt.Errorf("remove service: %d workloads still back it", len(eps)))
		return
	}
	s.dropService(svc)
	a.services[key] = append(a.services[key], "")
}

// allGone reports whether every endpoint of key in eps (the list before
// this delta) was removed or no longer backs key.
func (a *applier) allGone(key NamespacedHostname, eps []Endpoint) bool {
	for _, ep := range eps {
		cur, ok := a.s.byUID.get(ep.Workload.UID)
		if !ok {
			continue
		}
		if _, backs := cur.Services[key]; backs {
			return false
		}
	}
	// Workloads added by this delta are not in eps yet.
	for uid := range a.uids {
		if cur, ok := a.s.byUID.get(uid); ok {
			if _, backs := cur.Services[key]; backs {
				return false
			}
		}
	}
	return true
}

// upsertPolicy applies p; it reports whether the policy set changed.
func (a *applier) upsertPolicy(p *AuthorizationPolicy) bool {
	s := a.s
	key := p.Key()
	if p.Name == "" || p.Namespace == "" {
		a.reject("policy", key, errors.New("name and namespace are required"))
		return false
	}
	v := &validator{}
	checkPolicy(v, loc{"policy", -1, p.Namespace, p.Name}, p)
	old, exists := s.policyKeys.get(key)
	if refs, _ := s.policyRefs.get(key); refs > 0 && p.Scope != ScopeWorkloadSelector {
		v.addf("policy %s: scope %s, but %d workloads list it as a WorkloadSelector policy", key, p.Scope, refs)
	}
	if err := v.err(); err != nil {
		a.reject("policy", key, err)
		return false
	}
	s.policyKeys.set(key, p)
	a.ownPolicies()
	if exists {
		s.policies[slices.Index(s.policies, old)] = p
	} else {
		s.policies = append(s.policies, p)
	}
	return true
}

// ownPolicies makes the policy list this Apply's own on its first change
// (the parent snapshot keeps its list): one copy per Apply, not one per
// policy, which made a delta of n policies O(n²).
func (a *applier) ownPolicies() {
	if !a.policiesOwned {
		a.s.policies = slices.Clone(a.s.policies)
		a.policiesOwned = true
	}
}

// removePolicy removes the policy key; it reports whether it did.
func (a *applier) removePolicy(key string) bool {
	s := a.s
	old, ok := s.policyKeys.get(key)
	if !ok {
		return false
	}
	if refs, _ := s.policyRefs.get(key); refs > 0 {
		a.reject("policy", key, fmt.Errorf("remove policy: %d workloads still list it", refs))
		return false
	}
	s.policyKeys.del(key)
	a.ownPolicies()
	s.policies = slices.DeleteFunc(s.policies, func(p *AuthorizationPolicy) bool { return p == old })
	return true
}

// rebuild recomputes the node lists and endpoint lists the delta touched,
// and this node's enrolled list.
func (a *applier) rebuild() {
	s := a.s
	for node, uids := range a.nodes {
		old, _ := s.byNode.get(node)
		ws := make([]*Workload, 0, len(old)+len(uids))
		for _, w := range old {
			if !a.uids[w.UID] {
				ws = append(ws, w)
			}
		}
		for _, uid := range uids {
			if w, ok := s.byUID.get(uid); ok && w.Node == node {
				ws = append(ws, w)
			}
		}
		slices.SortFunc(ws, byUIDOrder)
		ws = slices.Compact(ws) // a UID touched twice appears twice
		if len(ws) == 0 {
			s.byNode.del(node)
		} else {
			s.byNode.set(node, ws)
		}
	}
	for key, uids := range a.services {
		svc, ok := s.svcByKey.get(key)
		if !ok {
			s.endpoints.del(key)
			continue
		}
		old, _ := s.endpoints.get(key)
		eps := make([]Endpoint, 0, len(old)+len(uids))
		for _, ep := range old {
			if !a.uids[ep.Workload.UID] {
				ep.Service = svc
				eps = append(eps, ep)
			}
		}
		for _, uid := range uids {
			if w, ok := s.byUID.get(uid); ok {
				if ports, backs := w.Services[key]; backs {
					eps = append(eps, Endpoint{Workload: w, Ports: ports, Service: svc})
				}
			}
		}
		slices.SortFunc(eps, endpointOrder)
		eps = slices.CompactFunc(eps, func(x, y Endpoint) bool { return x.Workload == y.Workload })
		if len(eps) == 0 {
			s.endpoints.del(key)
		} else {
			s.endpoints.set(key, eps)
		}
	}
	if _, touched := a.nodes[s.opts.Node]; s.opts.Node != "" && touched {
		s.reenroll()
	}
}
