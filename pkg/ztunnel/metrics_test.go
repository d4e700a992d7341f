package ztunnel

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/warren-mesh/warren/pkg/loader"
)

// TestResponseFlagValues pins each flag to ztunnel's label value
// (src/proxy/metrics.rs, EncodeLabelValue for ResponseFlags) or, for the two
// conditions ztunnel records no metric for, to Envoy's.
func TestResponseFlagValues(t *testing.T) {
	tests := []struct {
		origin string
		flag   string
		want   string
	}{
		{"ztunnel ResponseFlags::None", flagNone, "-"},
		{"ztunnel ResponseFlags::AuthorizationPolicyDenied", flagDenied, "DENY"},
		{"ztunnel ResponseFlags::ConnectionFailure", flagConnect, "CONNECT"},
		{"ztunnel ResponseFlags::NetworkPolicyError", flagNetworkPolicy, "NETWORK_POLICY"},
		{"Envoy UH (no healthy upstream)", flagNoHealthy, "UH"},
		{"Envoy NR (no route)", flagNoOrigDst, "NR"},
	}
	for _, tt := range tests {
		if tt.flag != tt.want {
			t.Errorf("%s: %q, want %q", tt.origin, tt.flag, tt.want)
		}
	}
}

// TestFlagLabels records a connection with each flag and reads every
// series back: a failure counts as opened, closed and failed with its flag;
// a connection that got through counts its bytes under the labels it
// opened with, and its close under its closing flag ("-", or a failure
// flag that also counts as failed).
func TestFlagLabels(t *testing.T) {
	base := connLabelValues{reporter: reporterSource, srcWorkload: "client", srcNamespace: "default", srcPrincipal: clientID,
		dstWorkload: "server", dstNamespace: "default", dstPrincipal: serverID, securityPolicy: securityMutualTLS}
	with := func(flag string) connLabelValues { v := base; v.responseFlags = flag; return v }
	labelsOf := func(v connLabelValues) []string { return v.values() }
	count := func(vec *prometheus.CounterVec, v connLabelValues) float64 {
		return testutil.ToFloat64(vec.WithLabelValues(labelsOf(v)...))
	}

	for _, flag := range []string{flagDenied, flagConnect, flagNetworkPolicy, flagNoHealthy, flagNoOrigDst} {
		t.Run("failed "+flag, func(t *testing.T) {
			m := NewMetrics(prometheus.NewRegistry())
			m.fail(with(flag))
			if got := with(flag).values()[11]; got != flag || connLabels[11] != "response_flags" {
				t.Fatalf("response_flags label %q = %q, want %q", connLabels[11], got, flag)
			}
			for name, vec := range map[string]*prometheus.CounterVec{"opened": m.opened, "closed": m.closed, "failed": m.failed} {
				if got := count(vec, with(flag)); got != 1 {
					t.Errorf("%s{response_flags=%q} = %v, want 1", name, flag, got)
				}
				if got := testutil.CollectAndCount(vec); got != 1 {
					t.Errorf("%s has %d series, want 1", name, got)
				}
			}
			if n := testutil.CollectAndCount(m.received) + testutil.CollectAndCount(m.sent); n != 0 {
				t.Errorf("a failed connection counted bytes (%d series)", n)
			}
		})
	}
	for _, flag := range []string{"", flagDenied, flagConnect} {
		t.Run("closed with "+map[string]string{"": "-"}[flag]+flag, func(t *testing.T) {
			m := NewMetrics(prometheus.NewRegistry())
			m.open(base)
			m.close(base, flag, 10, 20)
			closing := with(flag)
			if got := count(m.opened, base); got != 1 {
				t.Errorf("opened{-} = %v, want 1", got)
			}
			if got := count(m.closed, closing); got != 1 {
				t.Errorf("closed{%s} = %v, want 1", closing.values()[11], got)
			}
			if got := count(m.received, base); got != 10 {
				t.Errorf("received{-} = %v, want 10", got)
			}
			if got := count(m.sent, base); got != 20 {
				t.Errorf("sent{-} = %v, want 20", got)
			}
			wantFailed := 0
			if flag != "" {
				wantFailed = 1
				if got := count(m.failed, closing); got != 1 {
					t.Errorf("failed{%s} = %v, want 1", flag, got)
				}
			}
			if got := testutil.CollectAndCount(m.failed); got != wantFailed {
				t.Errorf("failed has %d series, want %d", got, wantFailed)
			}
			for name, vec := range map[string]*prometheus.CounterVec{"opened": m.opened, "closed": m.closed, "received": m.received, "sent": m.sent} {
				if got := testutil.CollectAndCount(vec); got != 1 {
					t.Errorf("%s has %d series, want 1", name, got)
				}
			}
		})
	}
	t.Run("empty labels", func(t *testing.T) {
		got := strings.Join(connLabelValues{reporter: reporterDestination}.values(), ",")
		want := "destination,unknown,unknown,unknown,unknown,unknown,unknown,unknown,unknown,unknown,tcp,-,unknown"
		if got != want {
			t.Errorf("values() = %s, want %s", got, want)
		}
	})
	t.Run("nil metrics record nothing", func(t *testing.T) {
		var m *Metrics
		m.open(base)
		m.close(base, flagConnect, 1, 1)
		m.fail(base)
	})
}

// TestFinished checks how a relayed connection's end is accounted: its
// response flag, error and reason, for each way it can end.
func TestFinished(t *testing.T) {
	relayErr := errors.New("read: connection reset by peer")
	tests := []struct {
		name      string
		revoked   *revocation
		removed   bool
		drained   bool
		relayErr  error
		wantFlags string
		wantErr   error
		reason    string
	}{
		{name: "ended cleanly", wantFlags: "-"},
		{name: "relay error", relayErr: relayErr, wantFlags: "CONNECT", wantErr: relayErr},
		{name: "policy change", revoked: &revocation{err: errRevokedPolicy, reason: "deny (deny_matched default/x)"}, relayErr: relayErr,
			wantFlags: "DENY", wantErr: errRevokedPolicy, reason: "deny (deny_matched default/x)"},
		{name: "drain deadline", revoked: &revocation{err: errRevokedDrain}, relayErr: relayErr, wantFlags: "-", wantErr: errRevokedDrain},
		{name: "workload removed", revoked: &revocation{err: errRevokedRemoved}, relayErr: relayErr, wantFlags: "-", wantErr: errRevokedRemoved},
		{name: "HBONE server closed with its workload", removed: true, relayErr: relayErr, wantFlags: "-", wantErr: errRevokedRemoved},
		{name: "HBONE server closed at the drain deadline", drained: true, relayErr: relayErr, wantFlags: "-", wantErr: errRevokedDrain},
		{name: "ended cleanly while the workload left", removed: true, wantFlags: "-"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			sink := newLogSink()
			p := &Proxy{deps: Deps{Metrics: NewMetrics(reg), AccessLog: slog.New(sink)}}
			if tt.drained {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				p.drain.Store(&ctx)
			}
			pd := &pod{proxy: p}
			pd.removed.Store(tt.removed)
			a, c := net.Pipe()
			defer a.Close()
			defer c.Close()
			tr := &tracked{pod: pd, end: a}
			if tt.revoked != nil {
				tr.revoke(tt.revoked.err, tt.revoked.reason)
				if err := a.SetReadDeadline(time.Time{}); err != nil {
					t.Fatal(err)
				}
			}
			rec := &connRecord{direction: "inbound", start: time.Now(), received: 1, sent: 2}
			rec.labels.reporter = reporterDestination
			p.finished(rec, tr, tt.relayErr)

			closing := connLabelValues{reporter: reporterDestination, responseFlags: tt.wantFlags}
			if got := testutil.ToFloat64(p.deps.Metrics.closed.WithLabelValues(closing.values()...)); got != 1 {
				t.Errorf("closed{response_flags=%s} = %v, want 1", tt.wantFlags, got)
			}
			wantFailed := 0
			if tt.wantFlags != "-" {
				wantFailed = 1
			}
			if got := testutil.CollectAndCount(p.deps.Metrics.failed); got != wantFailed {
				t.Errorf("failed series: %d, want %d", got, wantFailed)
			}
			open := connLabelValues{reporter: reporterDestination}
			if got := testutil.ToFloat64(p.deps.Metrics.received.WithLabelValues(open.values()...)); got != 1 {
				t.Errorf("received bytes under the opening labels = %v, want 1", got)
			}
			want := map[string]string{"response_flags": absent, "error": absent, "reason": absent, "bytes_received": "1", "bytes_sent": "2"}
			if tt.wantFlags != "-" {
				want["response_flags"] = tt.wantFlags
			}
			if tt.wantErr != nil {
				want["error"] = tt.wantErr.Error()
			}
			if tt.reason != "" {
				want["reason"] = tt.reason
			}
			checkLog(t, sink.next(t), want)
		})
	}
}

// statsFunc is a StatsReader.
type statsFunc func() (loader.Stats, error)

func (f statsFunc) Stats() (loader.Stats, error) { return f() }

// TestBPFCollector checks that every loader counter is exported by name,
// and that a failed read is an invalid metric rather than zeros.
func TestBPFCollector(t *testing.T) {
	c := NewBPFCollector(statsFunc(func() (loader.Stats, error) {
		return loader.Stats{Captured: 3, InboundCaptured: 2, ErrAssign: 1}, nil
	}))
	want := `
# HELP warren_bpf_events_total Capture decisions and errors counted by the BPF programs.
# TYPE warren_bpf_events_total counter
`
	for event, v := range (loader.Stats{Captured: 3, InboundCaptured: 2, ErrAssign: 1}).Events() {
		want += "warren_bpf_events_total{event=\"" + event + "\"} " + strconv.FormatUint(v, 10) + "\n"
	}
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	failing := NewBPFCollector(statsFunc(func() (loader.Stats, error) { return loader.Stats{}, os.ErrPermission }))
	reg := prometheus.NewRegistry()
	reg.MustRegister(failing)
	if _, err := reg.Gather(); err == nil || !strings.Contains(err.Error(), os.ErrPermission.Error()) {
		t.Errorf("gathering a failing collector: %v, want its error", err)
	}
}
