// Command labapp is the application that warren's lab tests, demo and
// benchmarks run inside pods.
//
//	labapp echo   -l :8080                echo every byte back; half-close passes through
//	labapp sink   -l :9000                read to EOF, answer "<bytes> <sha256>\n"
//	labapp whoami -l :8080                write "<local> <remote>\n", then echo
//	labapp source -c ip:port -n BYTES     send BYTES of seeded data, half-close, check the sink's sha256
//	labapp probe  -c ip:port [-m MSG]     connect, send MSG, half-close, print the reply as JSON
//	labapp give   -l :9001 -n BYTES       send BYTES of seeded data to each client, then half-close
//	labapp take   -c ip:port -n BYTES     read from give to EOF, check length and sha256
//	labapp fanout -c ip:port -n COUNT     COUNT connections to whoami servers, count answers per server
//	labapp idle   -c ip:port              connect, send nothing, wait for the connection to end; report how
//	labapp rr     -c ip:port -n COUNT     1 KiB request/response against echo, print latency percentiles
//
// Servers print "listening <addr>" once they accept connections. Clients print
// one JSON object and exit non-zero on any mismatch.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: labapp echo|sink|whoami|source|probe|rr [flags]")
		os.Exit(2)
	}
	mode := os.Args[1]
	if run, ok := benchMode(mode); ok { // benchmark modes: bench.go
		if err := run(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "labapp:", err)
			os.Exit(1)
		}
		return
	}
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	listen := fs.String("l", ":8080", "listen address (servers)")
	connect := fs.String("c", "", "server address (clients)")
	n := fs.Int64("n", 1<<20, "bytes to send (source) or requests (rr)")
	seed := fs.Uint64("seed", 1, "data seed (source)")
	msg := fs.String("m", "hello", "message (probe)")
	size := fs.Int("size", 1024, "request size (rr)")
	conns := fs.Int("conns", 1, "connections (rr)")
	rate := fs.Float64("rate", 0, "requests per second in total, 0 = as fast as possible (rr)")
	timeout := fs.Duration("timeout", 60*time.Second, "overall deadline (clients)")
	pace := fs.Duration("pace", 0, "spread the bytes over at least this long, 0 = as fast as possible (source)")
	fs.Parse(os.Args[2:])

	var err error
	switch mode {
	case "echo", "sink", "whoami":
		err = serve(mode, *listen, 0, 0)
	case "give":
		err = serve(mode, *listen, *n, *seed)
	case "idle":
		err = idle(*connect, *timeout)
	case "take":
		err = take(*connect, *n, *seed, *timeout)
	case "fanout":
		err = fanout(*connect, int(*n), *conns, *rate, *timeout)
	case "source":
		err = source(*connect, *n, *seed, *pace, *timeout)
	case "probe":
		err = probe(*connect, *msg, *timeout)
	case "rr":
		err = rr(*connect, int(*n), *size, *conns, *rate, *timeout)
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "labapp:", err)
		os.Exit(1)
	}
}

// listenUntilSignal listens on addr, announces it ("listening <addr>"), and
// closes the listener on SIGTERM or SIGINT so the accept loop ends cleanly.
func listenUntilSignal(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		ln.Close()
	}()
	return ln, nil
}

func serve(mode, addr string, n int64, seed uint64) error {
	ln, err := listenUntilSignal(addr)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		go handle(mode, c.(*net.TCPConn), n, seed)
	}
}

func handle(mode string, c *net.TCPConn, n int64, seed uint64) {
	defer c.Close()
	switch mode {
	case "give":
		io.Copy(c, seeded(n, seed))
		c.CloseWrite()
		io.Copy(io.Discard, c)
	case "echo":
		io.Copy(c, c)
		c.CloseWrite()
	case "whoami":
		fmt.Fprintf(c, "%s %s\n", c.LocalAddr(), c.RemoteAddr())
		io.Copy(c, c)
		c.CloseWrite()
	case "sink":
		h := sha256.New()
		nBytes, err := io.Copy(h, c)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "%d %s\n", nBytes, hex.EncodeToString(h.Sum(nil)))
		c.CloseWrite()
	}
}

// seeded returns a reader of n deterministic pseudo-random bytes.
func seeded(n int64, seed uint64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), byte(seed >> 24)}), n)
}

func dial(addr string, timeout time.Duration) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	c.SetDeadline(time.Now().Add(timeout))
	return c.(*net.TCPConn), nil
}

// pacedReader hands out r's bytes no faster than n bytes over d.
type pacedReader struct {
	r     io.Reader
	n     int64
	d     time.Duration
	start time.Time
	read  int64
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if p.start.IsZero() {
		p.start = time.Now()
	}
	if due := time.Duration(float64(p.d) * float64(p.read) / float64(p.n)); time.Since(p.start) < due {
		time.Sleep(due - time.Since(p.start))
	}
	k, err := p.r.Read(b[:min(len(b), 1<<20)])
	p.read += int64(k)
	return k, err
}

func source(addr string, n int64, seed uint64, pace, timeout time.Duration) error {
	c, err := dial(addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	start := time.Now()
	h := sha256.New()
	var data io.Reader = seeded(n, seed)
	if pace > 0 && n > 0 {
		data = &pacedReader{r: data, n: n, d: pace}
	}
	sent, err := io.Copy(io.MultiWriter(c, h), data)
	if err != nil {
		return fmt.Errorf("send to %s after %d bytes: %w", addr, sent, err)
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("half-close: %w", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read sink answer: %w", err)
	}
	elapsed := time.Since(start)
	want := hex.EncodeToString(h.Sum(nil))
	fields := strings.Fields(line)
	ok := len(fields) == 2 && fields[0] == strconv.FormatInt(sent, 10) && fields[1] == want
	out, _ := json.Marshal(map[string]any{
		"bytes": sent, "sha256": want, "answer": strings.TrimSpace(line), "ok": ok,
		"seconds": elapsed.Seconds(), "local": c.LocalAddr().String(),
	})
	fmt.Println(string(out))
	if !ok {
		return fmt.Errorf("sink answered %q, want %d %s", strings.TrimSpace(line), sent, want)
	}
	return nil
}

func probe(addr, msg string, timeout time.Duration) error {
	c, err := dial(addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("half-close: %w", err)
	}
	reply, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	out, _ := json.Marshal(map[string]string{
		"local": c.LocalAddr().String(), "remote": c.RemoteAddr().String(), "reply": string(reply),
	})
	fmt.Println(string(out))
	return nil
}

// rr sends count requests of size bytes over conns connections to an echo
// server, paced at rate requests/s in total when rate > 0, and reports latency.
func rr(addr string, count, size, conns int, rate float64, timeout time.Duration) error {
	if conns < 1 || count < conns {
		return fmt.Errorf("need 1 <= conns <= count")
	}
	type result struct {
		lat []time.Duration
		err error
	}
	results := make(chan result, conns)
	start := time.Now()
	for i := 0; i < conns; i++ {
		per := count / conns
		if i < count%conns {
			per++
		}
		var interval time.Duration
		if rate > 0 {
			interval = time.Duration(float64(time.Second) * float64(conns) / rate)
		}
		go func(per int) {
			var r result
			defer func() { results <- r }()
			c, err := dial(addr, timeout)
			if err != nil {
				r.err = err
				return
			}
			defer c.Close()
			req := make([]byte, size)
			resp := make([]byte, size)
			next := time.Now()
			for k := 0; k < per; k++ {
				if interval > 0 {
					time.Sleep(time.Until(next))
					next = next.Add(interval)
				}
				t0 := time.Now()
				if _, err := c.Write(req); err != nil {
					r.err = fmt.Errorf("write: %w", err)
					return
				}
				if _, err := io.ReadFull(c, resp); err != nil {
					r.err = fmt.Errorf("read: %w", err)
					return
				}
				r.lat = append(r.lat, time.Since(t0))
			}
		}(per)
	}
	var all []time.Duration
	for i := 0; i < conns; i++ {
		r := <-results
		if r.err != nil {
			return r.err
		}
		all = append(all, r.lat...)
	}
	elapsed := time.Since(start)
	slices.Sort(all)
	pct := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))].Microseconds()) / 1000 }
	out, _ := json.Marshal(map[string]any{
		"requests": len(all), "seconds": elapsed.Seconds(), "rps": float64(len(all)) / elapsed.Seconds(),
		"p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
	})
	fmt.Println(string(out))
	return nil
}

// take reads everything a give server sends and checks it is the n seeded bytes.
func take(addr string, n int64, seed uint64, timeout time.Duration) error {
	c, err := dial(addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	start := time.Now()
	want := sha256.New()
	io.Copy(want, seeded(n, seed))
	got := sha256.New()
	read, err := io.Copy(got, c)
	if err != nil {
		return fmt.Errorf("read from %s after %d bytes: %w", addr, read, err)
	}
	ok := read == n && string(got.Sum(nil)) == string(want.Sum(nil))
	out, _ := json.Marshal(map[string]any{"bytes": read, "ok": ok, "seconds": time.Since(start).Seconds(), "sha256": hex.EncodeToString(got.Sum(nil))})
	fmt.Println(string(out))
	if !ok {
		return fmt.Errorf("received %d bytes (sha256 %x), want %d (sha256 %x)", read, got.Sum(nil), n, want.Sum(nil))
	}
	return nil
}

// fanout opens count connections (conns at a time, paced at rate per second
// in total when rate > 0) to whoami servers and counts which server answered.
func fanout(addr string, count, conns int, rate float64, timeout time.Duration) error {
	if conns < 1 {
		conns = 1
	}
	type answer struct {
		server string
		err    error
		took   time.Duration
	}
	jobs := make(chan struct{})
	answers := make(chan answer)
	for i := 0; i < conns; i++ {
		go func() {
			for range jobs {
				began := time.Now()
				answers <- func() (a answer) {
					defer func() { a.took = time.Since(began) }()
					c, err := dial(addr, timeout)
					if err != nil {
						return answer{err: err}
					}
					defer c.Close()
					// 1 KiB each way: whoami echoes what follows its line.
					if _, err := c.Write(fanoutPayload); err != nil {
						return answer{err: fmt.Errorf("write: %w", err)}
					}
					c.CloseWrite()
					r := bufio.NewReader(c)
					line, err := r.ReadString('\n')
					if err != nil {
						return answer{err: fmt.Errorf("read: %w", err)}
					}
					f := strings.Fields(line)
					if len(f) != 2 {
						return answer{err: fmt.Errorf("whoami answered %q", line)}
					}
					echo := make([]byte, len(fanoutPayload))
					if _, err := io.ReadFull(r, echo); err != nil {
						return answer{err: fmt.Errorf("read echo: %w", err)}
					}
					if string(echo) != string(fanoutPayload) {
						return answer{err: errors.New("echo differs")}
					}
					return answer{server: f[0]}
				}()
			}
		}()
	}
	go func() {
		var tick *time.Ticker
		if rate > 0 {
			tick = time.NewTicker(time.Duration(float64(time.Second) / rate))
			defer tick.Stop()
		}
		for i := 0; i < count; i++ {
			if tick != nil {
				<-tick.C
			}
			jobs <- struct{}{}
		}
		close(jobs)
	}()
	start := time.Now()
	servers := map[string]int{}
	var failures []string
	var took []time.Duration
	refused, reset := 0, 0
	for i := 0; i < count; i++ {
		a := <-answers
		if a.err != nil {
			failures = append(failures, a.err.Error())
			switch {
			case errors.Is(a.err, syscall.ECONNREFUSED):
				refused++
			case errors.Is(a.err, syscall.ECONNRESET), errors.Is(a.err, io.EOF):
				reset++
			}
			continue
		}
		took = append(took, a.took)
		servers[a.server]++
	}
	if len(failures) > 5 {
		failures = append(failures[:5], "...")
	}
	slices.Sort(took)
	pct := func(q float64) float64 {
		if len(took) == 0 {
			return 0
		}
		return float64(took[min(len(took)-1, int(q*float64(len(took))))].Microseconds()) / 1000
	}
	out, _ := json.Marshal(map[string]any{"servers": servers, "failed": count - sumCounts(servers), "errors": failures,
		"refused": refused, "reset": reset, "p50ms": pct(0.5), "p99ms": pct(0.99), "maxms": pct(1),
		"seconds": time.Since(start).Seconds()})
	fmt.Println(string(out))
	return nil
}

// fanoutPayload is the 1 KiB each fanout connection sends and expects back.
var fanoutPayload = []byte(strings.Repeat("0123456789abcdef", 64))

func sumCounts(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// idle keeps an idle connection open until the other side or the network
// ends it, and reports how ("eof" or "reset") and after how long. It fails
// if the deadline passes first.
func idle(addr string, timeout time.Duration) error {
	c, err := dial(addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Println("connected")
	start := time.Now()
	_, err = io.Copy(io.Discard, c)
	ended := "eof"
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("still open after %s", timeout)
	case err != nil:
		ended = "reset"
	}
	out, _ := json.Marshal(map[string]any{"ended": ended, "seconds": time.Since(start).Seconds(), "error": fmt.Sprint(err)})
	fmt.Println(string(out))
	return nil
}
