// Package spiretest runs a real SPIRE server and agent on loopback for tests:
// the agent serves the Workload API and the Delegated Identity API on Unix
// sockets in a short temporary directory, trusts the delegates it is given,
// and attests workloads by Unix UID and by entries registered with any
// selectors (k8s:ns:..., k8s:sa:... included, as the node agent asks for
// them). The binaries are built by hack/build-spire.sh (make tools) into the
// tools cache; without them a test skips, or fails when
// WARREN_REQUIRE_PRIVILEGED=1 (CI).
//
// Every process it starts is stopped, by its own PID, when the test ends;
// their logs are printed when the test failed.
package spiretest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/warren-mesh/warren/internal/testenv"
)

// Version is the SPIRE release hack/build-spire.sh builds.
const Version = "1.13.3"

// Bins returns the directory holding spire-server and spire-agent, or skips
// (fails in CI) when they have not been built.
func Bins(tb testing.TB) string {
	tb.Helper()
	cache := os.Getenv("WARREN_TOOLS_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "warren", "tools")
	}
	dir := filepath.Join(cache, "spire-v"+Version)
	for _, b := range []string{"spire-server", "spire-agent"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			testenv.SkipOrFail(tb, "SPIRE v%s not built (%v): run make tools (hack/build-spire.sh)", Version, err)
		}
	}
	return dir
}

// Options configure Start.
type Options struct {
	// TrustDomain of the server and agent, e.g. cluster.local. Required.
	TrustDomain string
	// Delegates are the SPIFFE IDs in the agent's authorized_delegates: the
	// callers allowed to use the Delegated Identity API.
	Delegates []string
}

// Env is a running SPIRE server and agent.
type Env struct {
	// Bin is the directory of the SPIRE binaries.
	Bin string
	// Dir holds the sockets, configurations, data and logs.
	Dir string
	// TrustDomain is the trust domain served.
	TrustDomain string
	// ServerSocket is the server's API socket (for spire-server commands).
	ServerSocket string
	// WorkloadSocket is the agent's Workload API socket (socket_path).
	WorkloadSocket string
	// AdminSocket is the agent's admin socket (admin_socket_path), which
	// serves the Delegated Identity API.
	AdminSocket string
	// AgentID is the agent's SPIFFE ID, the parent of every entry Register creates.
	AgentID string
}

// Start runs a SPIRE server and an agent attested to it by join token, and
// returns once both answer their health checks.
func Start(tb testing.TB, opts Options) *Env {
	tb.Helper()
	if opts.TrustDomain == "" {
		tb.Fatal("spiretest: no trust domain")
	}
	bin := Bins(tb)
	// Unix socket paths must stay under 108 bytes: a short directory in /tmp.
	dir, err := os.MkdirTemp("", "wspire")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"server", "agent", "admin", "workload"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			tb.Fatal(err)
		}
	}
	e := &Env{
		Bin: bin, Dir: dir, TrustDomain: opts.TrustDomain,
		ServerSocket:   filepath.Join(dir, "server", "api.sock"),
		WorkloadSocket: filepath.Join(dir, "workload", "api.sock"),
		AdminSocket:    filepath.Join(dir, "admin", "admin.sock"),
	}
	port := freePort(tb)
	serverConf := fmt.Sprintf(`
server {
    bind_address = "127.0.0.1"
    bind_port = "%d"
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
    default_x509_svid_ttl = "1h"
    ca_key_type = "ec-p256"
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
`, port, e.ServerSocket, e.TrustDomain, filepath.Join(dir, "server"), filepath.Join(dir, "server", "datastore.sqlite3"))
	writeFile(tb, filepath.Join(dir, "server.conf"), serverConf)
	server := start(tb, dir, "spire-server", filepath.Join(bin, "spire-server"), "run", "-config", filepath.Join(dir, "server.conf"))
	waitOK(tb, server, filepath.Join(bin, "spire-server"), "healthcheck", "-socketPath", e.ServerSocket)

	out := run(tb, filepath.Join(bin, "spire-server"), "token", "generate", "-socketPath", e.ServerSocket, "-ttl", "600")
	token := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(out, "\n", 2)[0], "Token:"))
	if token == "" {
		tb.Fatalf("spiretest: no join token in %q", out)
	}
	e.AgentID = "spiffe://" + e.TrustDomain + "/spire/agent/join_token/" + token

	delegates := make([]string, len(opts.Delegates))
	for i, d := range opts.Delegates {
		delegates[i] = strconv.Quote(d)
	}
	agentConf := fmt.Sprintf(`
agent {
    data_dir = %q
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%d"
    socket_path = %q
    admin_socket_path = %q
    trust_domain = %q
    insecure_bootstrap = true
    join_token = %q
    authorized_delegates = [%s]
    experimental {
        sync_interval = "1s"
    }
}
plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`, filepath.Join(dir, "agent"), port, e.WorkloadSocket, e.AdminSocket, e.TrustDomain, token, strings.Join(delegates, ", "))
	writeFile(tb, filepath.Join(dir, "agent.conf"), agentConf)
	agent := start(tb, dir, "spire-agent", filepath.Join(bin, "spire-agent"), "run", "-config", filepath.Join(dir, "agent.conf"))
	waitOK(tb, agent, filepath.Join(bin, "spire-agent"), "healthcheck", "-socketPath", e.WorkloadSocket)
	return e
}

// Register creates a registration entry for spiffeID under this node's
// agent, with an X.509-SVID lifetime of ttl (the server's default, 1 h, when
// zero) and the given selectors (type:value, e.g. k8s:ns:default).
func (e *Env) Register(tb testing.TB, spiffeID string, ttl time.Duration, selectors ...string) {
	tb.Helper()
	args := []string{filepath.Join(e.Bin, "spire-server"), "entry", "create", "-socketPath", e.ServerSocket,
		"-parentID", e.AgentID, "-spiffeID", spiffeID}
	if ttl > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(ttl/time.Second)))
	}
	for _, s := range selectors {
		args = append(args, "-selector", s)
	}
	run(tb, args...)
}

// RegisterSelf registers spiffeID for this process's Unix UID and waits until
// the agent hands it out over the Workload API: until then the agent also
// refuses this process as a delegate (entries take a few seconds to arrive).
func (e *Env) RegisterSelf(tb testing.TB, spiffeID string) {
	tb.Helper()
	e.Register(tb, spiffeID, 0, fmt.Sprintf("unix:uid:%d", os.Getuid()))
	deadline := time.Now().Add(45 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+e.WorkloadSocket))
		cancel()
		if err == nil && svid.ID.String() == spiffeID {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("spiretest: own SVID %s never arrived: %v (got %v)", spiffeID, err, svid)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// proc is a SPIRE process this package started; only its PID is ever signalled.
type proc struct {
	name string
	done chan struct{}
}

func start(tb testing.TB, dir, name string, args ...string) *proc {
	tb.Helper()
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("spiretest: start %s: %v", name, err)
	}
	p := &proc{name: name, done: make(chan struct{})}
	go func() { cmd.Wait(); logf.Close(); close(p.done) }()
	tb.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-p.done
		}
		if tb.Failed() {
			b, _ := os.ReadFile(logPath)
			if len(b) > 4096 {
				b = b[len(b)-4096:]
			}
			tb.Logf("%s log (last 4 KiB):\n%s", name, b)
		}
	})
	return p
}

func run(tb testing.TB, args ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		tb.Fatalf("spiretest: %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// waitOK runs args until they succeed or 30 s pass.
func waitOK(tb testing.TB, p *proc, args ...string) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err == nil {
			return
		}
		select {
		case <-p.done:
			tb.Fatalf("spiretest: %s exited: %s", p.name, out)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("spiretest: %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func freePort(tb testing.TB) int {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func writeFile(tb testing.TB, path, s string) {
	tb.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		tb.Fatal(err)
	}
}
