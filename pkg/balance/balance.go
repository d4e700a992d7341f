// Package balance picks the endpoint of a service VIP connection.
//
// Default policy (a service without LoadBalancing): among the service's
// endpoints that are healthy, have a non-zero capacity, an address and a
// target port for the requested service port, keep those whose locality
// best matches the client's (region, then zone, then subzone: the longest
// equal prefix wins), and pick one at random weighted by capacity. When no
// endpoint is usable in the best locality the next best is used (failover),
// down to any locality. This is ztunnel's Failover mode with routing
// preferences [region, zone, subzone] (src/state.rs load_balance,
// github.com/istio/ztunnel at 62d826530e5c) with capacity weights; a client
// without a region has no preference.
//
// A service with LoadBalancing (istiod's) is picked as ztunnel picks it:
// the rank of an endpoint is how many scopes of the routing preference, in
// order, it shares with the client before the first it does not; Failover
// keeps the best rank, Strict keeps only endpoints sharing every scope (none
// is a failure, never a fallback), Standard ignores the preference;
// AllowUnhealthy also considers endpoints that are not Healthy. Capacity
// weights apply in every mode.
//
// No usable endpoint at all is a *NoHealthyEndpointError, which matches
// ErrNoHealthyEndpoint with errors.Is: the proxy resets the client at once.
package balance

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"

	"github.com/warren-mesh/warren/pkg/config"
)

// ErrNoHealthyEndpoint means a known service has no endpoint that can take
// the connection.
var ErrNoHealthyEndpoint = errors.New("no healthy endpoint")

// NoHealthyEndpointError says which service had no usable endpoint, and why.
type NoHealthyEndpointError struct {
	Service config.NamespacedHostname
	Port    uint16
	// Endpoints is how many endpoints the service has; Unhealthy how many of
	// them were unhealthy (the rest lacked capacity, address or port).
	Endpoints int
	Unhealthy int
}

// Error describes the service, port and endpoint counts.
func (e *NoHealthyEndpointError) Error() string {
	return fmt.Sprintf("service %s port %d: no healthy endpoint (%d endpoints, %d unhealthy)",
		e.Service, e.Port, e.Endpoints, e.Unhealthy)
}

// Is makes errors.Is(err, ErrNoHealthyEndpoint) true.
func (e *NoHealthyEndpointError) Is(target error) bool { return target == ErrNoHealthyEndpoint }

// Rand is the random source; *math/rand/v2.Rand implements it.
type Rand interface {
	Uint64N(n uint64) uint64
}

type globalRand struct{}

func (globalRand) Uint64N(n uint64) uint64 { return rand.Uint64N(n) }

// Endpoints gives a service's endpoints; *config.Snapshot implements it.
type Endpoints interface {
	Endpoints(svc *config.Service) []config.Endpoint
}

// Picker chooses endpoints. It is safe for concurrent use.
type Picker struct {
	mu  sync.Mutex
	rnd Rand
}

// New returns a picker drawing from r; nil uses math/rand/v2's global source.
func New(r Rand) *Picker {
	if r == nil {
		r = globalRand{}
	}
	return &Picker{rnd: r}
}

// Choice is a picked endpoint and the address to dial.
type Choice struct {
	Endpoint config.Endpoint
	// Addr is the endpoint's IP (same family as the VIP when it has one) and
	// the target port.
	Addr netip.AddrPort
}

// Workload returns the chosen workload.
func (c Choice) Workload() *config.Workload { return c.Endpoint.Workload }

// Pick chooses an endpoint of svc for a connection to vip (the VIP and
// service port the client dialed) from the client workload from (nil: no
// preference).
func (p *Picker) Pick(src Endpoints, svc *config.Service, vip netip.AddrPort, from *config.Workload) (Choice, error) {
	eps := src.Endpoints(svc)
	port := vip.Port()
	lb := svc.LoadBalancing
	// Pass 1: the best rank among usable endpoints and its total capacity.
	// Pass 2: walk the same endpoints to the drawn weight. No allocation.
	bestRank, unhealthy := -1, 0
	var total uint64
	for _, ep := range eps {
		if !healthy(lb, ep.Workload) {
			unhealthy++
			continue
		}
		if !usable(ep, port) {
			continue
		}
		switch r := rank(lb, from, ep.Workload); {
		case r < 0:
		case r > bestRank:
			bestRank, total = r, uint64(ep.Workload.Capacity)
		case r == bestRank:
			total += uint64(ep.Workload.Capacity)
		}
	}
	if bestRank < 0 {
		return Choice{}, &NoHealthyEndpointError{Service: svc.Key(), Port: port, Endpoints: len(eps), Unhealthy: unhealthy}
	}
	p.mu.Lock()
	n := p.rnd.Uint64N(total)
	p.mu.Unlock()
	var chosen config.Endpoint
	for _, ep := range eps {
		w := ep.Workload
		if !healthy(lb, w) || !usable(ep, port) || rank(lb, from, w) != bestRank {
			continue
		}
		chosen = ep
		if n < uint64(w.Capacity) {
			break
		}
		n -= uint64(w.Capacity)
	}
	target, _ := chosen.TargetPort(port)
	return Choice{Endpoint: chosen, Addr: netip.AddrPortFrom(address(chosen.Workload, vip.Addr()), target)}, nil
}

// healthy reports whether w may be picked under lb's health policy.
func healthy(lb *config.LoadBalancing, w *config.Workload) bool {
	return w.Status == config.Healthy || (lb != nil && lb.AllowUnhealthy)
}

// usable reports whether a healthy endpoint can take a connection to port.
func usable(ep config.Endpoint, port uint16) bool {
	_, ok := ep.TargetPort(port)
	return ok && ep.Workload.Capacity > 0 && len(ep.Workload.WorkloadIPs) > 0
}

// rank is w's preference for a client from: higher is better, -1 means
// never (Strict without a full match).
func rank(lb *config.LoadBalancing, from, w *config.Workload) int {
	if from == nil {
		if lb != nil && lb.Mode == config.LBStrict && len(lb.RoutingPreference) > 0 {
			return -1 // nothing to match against
		}
		return 0
	}
	if lb == nil {
		return localityRank(from.Locality(), w.Locality())
	}
	if lb.Mode == config.LBStandard {
		return 0
	}
	r := 0
	for _, s := range lb.RoutingPreference {
		if !s.Shared(from, w) {
			break
		}
		r++
	}
	if lb.Mode == config.LBStrict && r != len(lb.RoutingPreference) {
		return -1
	}
	return r
}

// localityRank counts the locality levels shared with the client, from the
// region down; a client without a region ranks every endpoint 0.
func localityRank(from, to config.Locality) int {
	if from.Region == "" || from.Region != to.Region {
		return 0
	}
	if from.Zone != to.Zone {
		return 1
	}
	if from.Subzone != to.Subzone {
		return 2
	}
	return 3
}

// address prefers the workload IP of the VIP's family.
func address(w *config.Workload, vip netip.Addr) netip.Addr {
	vip = vip.Unmap()
	for _, ip := range w.WorkloadIPs {
		if ip.Is4() == vip.Is4() {
			return ip
		}
	}
	return w.WorkloadIPs[0]
}
