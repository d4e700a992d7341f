package config

import "reflect"

// ChangedWorkloads calls fn(old, new) for every workload UID whose
// workload differs between a and b (old or new is nil when absent on that
// side). Index shards and workloads the two snapshots share are skipped
// without being compared, so for b derived from a by Apply (directly or
// through several Applies) it costs O(shards + changed shards); snapshots
// built separately by NewSnapshot are compared in full (reflect.DeepEqual
// per workload).
func ChangedWorkloads(a, b *Snapshot, fn func(old, new *Workload)) {
	differ := func(x, y *Workload) bool { return x != y && !reflect.DeepEqual(x, y) }
	diffShards(&a.byUID, &b.byUID, differ, func(_ string, x *Workload, _ bool, y *Workload, _ bool) { fn(x, y) })
}

// SameServices reports whether a and b have equal services (not endpoints:
// see ChangedWorkloads), at the cost of ChangedWorkloads.
func SameServices(a, b *Snapshot) bool {
	same := true
	differ := func(x, y *Service) bool { return x != y && !reflect.DeepEqual(x, y) }
	diffShards(&a.svcByKey, &b.svcByKey, differ, func(NamespacedHostname, *Service, bool, *Service, bool) { same = false })
	return same
}

// SamePolicies reports whether a and b have equal authorization policies
// (in the same order) and peer authentications: O(policies) pointer
// comparisons when they share them.
func SamePolicies(a, b *Snapshot) bool {
	return reflect.DeepEqual(a.policies, b.policies) && reflect.DeepEqual(a.peerAuths, b.peerAuths)
}
