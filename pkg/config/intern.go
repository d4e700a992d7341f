package config

import "unique"

// Intern returns the canonical copy of s (package unique), so that the
// values a mesh repeats across its workloads and services — namespaces,
// service accounts, trust domains, networks, nodes, clusters, localities,
// hostnames — are held once, not once per workload. NewSnapshot and Apply
// intern what they index; providers may intern earlier to drop their own
// copies sooner.
//
// The canonical copy lives while a handle to it does; snapshots keep the
// strings, not handles, so after a garbage collection in which no handle
// survived, the next Intern of a value makes a new canonical copy. Sharing
// is thus per value and per GC epoch: at most one copy per distinct value
// per epoch, never one per workload.
func Intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// internWorkload interns w's repeated strings in place.
func internWorkload(w *Workload) {
	w.Namespace = Intern(w.Namespace)
	w.TrustDomain = Intern(w.TrustDomain)
	w.ServiceAccount = Intern(w.ServiceAccount)
	w.Network = Intern(w.Network)
	w.Node = Intern(w.Node)
	w.ClusterID = Intern(w.ClusterID)
	w.WorkloadName = Intern(w.WorkloadName)
	w.WorkloadType = Intern(w.WorkloadType)
	w.CanonicalName = Intern(w.CanonicalName)
	w.CanonicalRevision = Intern(w.CanonicalRevision)
	w.Locality = Locality{Region: Intern(w.Locality.Region), Zone: Intern(w.Locality.Zone), Subzone: Intern(w.Locality.Subzone)}
}
