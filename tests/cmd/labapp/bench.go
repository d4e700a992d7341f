package main

// Benchmark modes, used by tests/bench. Every client is bounded by -d (or
// -hold) and prints one JSON object; servers print "listening <addr>".
//
//	labapp drain -l :9100                       read each connection to EOF, answer "<bytes>\n"
//	labapp becho -l :9200                       echo with a 16 KiB buffer (no splice), close at EOF
//	labapp bulk  -c ip:port -streams N -d 5s    N streams to drain for -d, print bytes and seconds
//	labapp load  -c ip:port -conns 4 -rate R -d 10s -size 1024
//	                                            request/response against becho, paced at R/s in
//	                                            total (0 = as fast as possible), latency percentiles
//	labapp cps   -c ip:port -conns 8 -d 5s      connect, 1 KiB echo, close, in a loop on each worker
//	labapp hold  -c ip:port -n 10000 -hold 2m   open n connections, 1-byte echo on each, print
//	                                            "holding", keep them until SIGTERM or -hold

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// benchMode returns the runner of a benchmark mode, or false if mode is not one.
func benchMode(mode string) (func(args []string) error, bool) {
	switch mode {
	case "drain", "becho":
		return func(args []string) error {
			fs := flag.NewFlagSet(mode, flag.ExitOnError)
			listen := fs.String("l", ":9100", "listen address")
			fs.Parse(args)
			return benchServe(mode, *listen)
		}, true
	case "bulk", "load", "cps", "hold":
		return func(args []string) error {
			fs := flag.NewFlagSet(mode, flag.ExitOnError)
			o := benchOpts{}
			fs.StringVar(&o.addr, "c", "", "server address")
			fs.IntVar(&o.streams, "streams", 1, "parallel streams (bulk)")
			fs.IntVar(&o.conns, "conns", 4, "connections (load) or workers (cps)")
			fs.Float64Var(&o.rate, "rate", 0, "requests per second in total, 0 = as fast as possible (load)")
			fs.IntVar(&o.size, "size", 1024, "request size (load, cps)")
			fs.DurationVar(&o.dur, "d", 5*time.Second, "duration (bulk, load, cps)")
			fs.IntVar(&o.n, "n", 1000, "connections to hold (hold)")
			fs.IntVar(&o.par, "par", 64, "concurrent dials (hold)")
			fs.DurationVar(&o.hold, "hold", 2*time.Minute, "longest time to hold (hold)")
			fs.Parse(args)
			if o.addr == "" {
				return errors.New("-c is required")
			}
			switch mode {
			case "bulk":
				return benchBulk(o)
			case "load":
				return benchLoad(o)
			case "cps":
				return benchCPS(o)
			default:
				return benchHold(o)
			}
		}, true
	}
	return nil, false
}

type benchOpts struct {
	addr                 string
	streams, conns, size int
	n, par               int
	rate                 float64
	dur, hold            time.Duration
}

func printJSON(v any) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func benchServe(mode, addr string) error {
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
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		tc := c.(*net.TCPConn)
		if mode == "drain" {
			go drainConn(tc)
		} else {
			go echoConn(tc)
		}
	}
}

// drainConn reads to EOF with a large buffer and answers the byte count.
func drainConn(c *net.TCPConn) {
	defer c.Close()
	buf := make([]byte, 256<<10)
	var n int64
	for {
		k, err := c.Read(buf)
		n += int64(k)
		if err != nil {
			if err != io.EOF {
				return
			}
			break
		}
	}
	fmt.Fprintf(c, "%d\n", n)
	c.CloseWrite()
}

// echoConn echoes with a plain read/write loop: no splice pipes, so an idle
// connection costs the server only its socket and goroutine. The buffer
// is allocated on first data.
func echoConn(c *net.TCPConn) {
	defer c.Close()
	var buf []byte
	one := make([]byte, 1)
	for {
		b := one
		if buf != nil {
			b = buf
		}
		k, err := c.Read(b)
		if k > 0 {
			if _, werr := c.Write(b[:k]); werr != nil {
				return
			}
			if buf == nil {
				buf = make([]byte, 16<<10)
			}
		}
		if err != nil {
			c.CloseWrite()
			return
		}
	}
}

func benchDial(addr string) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return c.(*net.TCPConn), nil
}

// benchBulk sends from o.streams connections for o.dur and reports what the drains counted.
func benchBulk(o benchOpts) error {
	type res struct {
		n   int64
		err error
	}
	out := make(chan res, o.streams)
	start := time.Now()
	stop := start.Add(o.dur)
	for i := 0; i < o.streams; i++ {
		go func() {
			var r res
			defer func() { out <- r }()
			c, err := benchDial(o.addr)
			if err != nil {
				r.err = err
				return
			}
			defer c.Close()
			c.SetDeadline(stop.Add(30 * time.Second))
			buf := make([]byte, 256<<10)
			for time.Now().Before(stop) {
				if _, err := c.Write(buf); err != nil {
					r.err = fmt.Errorf("write: %w", err)
					return
				}
			}
			if err := c.CloseWrite(); err != nil {
				r.err = fmt.Errorf("half-close: %w", err)
				return
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				r.err = fmt.Errorf("read drain answer: %w", err)
				return
			}
			r.n, r.err = strconv.ParseInt(strings.TrimSpace(line), 10, 64)
		}()
	}
	var total int64
	var errs []error
	for i := 0; i < o.streams; i++ {
		r := <-out
		total += r.n
		errs = append(errs, r.err)
	}
	elapsed := time.Since(start).Seconds()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	printJSON(map[string]any{"bytes": total, "seconds": elapsed, "bytes_per_s": float64(total) / elapsed, "streams": o.streams})
	return nil
}

// percentiles returns p50, p90, p99 and p99.9 of sorted latencies in microseconds.
func percentiles(lat []time.Duration) map[string]float64 {
	slices.Sort(lat)
	m := map[string]float64{}
	if len(lat) == 0 {
		return m
	}
	for _, p := range []struct {
		name string
		q    float64
	}{{"p50_us", 0.50}, {"p90_us", 0.90}, {"p99_us", 0.99}, {"p999_us", 0.999}} {
		i := int(p.q*float64(len(lat))+0.5) - 1
		i = max(0, min(i, len(lat)-1))
		m[p.name] = float64(lat[i].Nanoseconds()) / 1e3
	}
	return m
}

// benchLoad runs request/response over o.conns connections for o.dur. With
// o.rate > 0 each connection sends on a fixed schedule (rate/conns per
// second); latency is measured from the write of a request to the last byte
// of its response, as fortio does.
func benchLoad(o benchOpts) error {
	type res struct {
		lat  []time.Duration
		late int
		err  error
	}
	out := make(chan res, o.conns)
	conns := make([]*net.TCPConn, o.conns)
	for i := range conns {
		c, err := benchDial(o.addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetNoDelay(true)
		conns[i] = c
	}
	// One warm-up exchange per connection: the mesh path is set up before timing starts.
	req := make([]byte, o.size)
	resp := make([]byte, o.size)
	for _, c := range conns {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(req); err != nil {
			return fmt.Errorf("warm-up write: %w", err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return fmt.Errorf("warm-up read: %w", err)
		}
	}
	var interval time.Duration
	if o.rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(o.conns) / o.rate)
	}
	start := time.Now()
	stop := start.Add(o.dur)
	for i, c := range conns {
		go func() {
			var r res
			defer func() { out <- r }()
			c.SetDeadline(stop.Add(30 * time.Second))
			req := make([]byte, o.size)
			resp := make([]byte, o.size)
			r.lat = make([]time.Duration, 0, 1024)
			// Stagger the connections' schedules across one interval.
			next := start.Add(time.Duration(i) * interval / time.Duration(o.conns))
			for {
				if interval > 0 {
					if d := time.Until(next); d > 0 {
						time.Sleep(d)
					} else if d < -interval {
						r.late++
					}
					if !next.Before(stop) {
						return
					}
					next = next.Add(interval)
				} else if !time.Now().Before(stop) {
					return
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
		}()
	}
	var all []time.Duration
	var errs []error
	late := 0
	for range conns {
		r := <-out
		all = append(all, r.lat...)
		late += r.late
		errs = append(errs, r.err)
	}
	elapsed := time.Since(start).Seconds()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	m := map[string]any{"requests": len(all), "seconds": elapsed, "rps": float64(len(all)) / elapsed, "late": late}
	for k, v := range percentiles(all) {
		m[k] = v
	}
	printJSON(m)
	return nil
}

// benchCPS runs o.conns workers for o.dur, each in a loop: connect, send
// o.size bytes, read them back, close.
func benchCPS(o benchOpts) error {
	var done, failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	stop := start.Add(o.dur)
	var wg sync.WaitGroup
	lats := make([][]time.Duration, o.conns)
	for w := 0; w < o.conns; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := make([]byte, o.size)
			resp := make([]byte, o.size)
			for time.Now().Before(stop) {
				t0 := time.Now()
				err := func() error {
					c, err := benchDial(o.addr)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err := c.Write(req); err != nil {
						return fmt.Errorf("write: %w", err)
					}
					if _, err := io.ReadFull(c, resp); err != nil {
						return fmt.Errorf("read: %w", err)
					}
					return nil
				}()
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					time.Sleep(10 * time.Millisecond)
					continue
				}
				done.Add(1)
				lats[w] = append(lats[w], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	m := map[string]any{"connections": done.Load(), "failed": failed.Load(), "seconds": elapsed,
		"conns_per_s": float64(done.Load()) / elapsed}
	if e := firstErr.Load(); e != nil {
		m["error"] = e
	}
	for k, v := range percentiles(all) {
		m[k] = v
	}
	printJSON(m)
	if done.Load() == 0 {
		return fmt.Errorf("no connection completed: %v", firstErr.Load())
	}
	return nil
}

// benchHold opens o.n connections (o.par dials at a time), exchanges one
// byte on each so the whole path is established, prints a JSON line with
// "holding", and keeps them open until SIGTERM or o.hold passes.
func benchHold(o benchOpts) error {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	conns := make([]*net.TCPConn, o.n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	start := time.Now()
	sem := make(chan struct{}, o.par)
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for i := range conns {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			err := func() error {
				c, err := benchDial(o.addr)
				if err != nil {
					return err
				}
				conns[i] = c
				c.SetDeadline(time.Now().Add(30 * time.Second))
				if _, err := c.Write([]byte{'x'}); err != nil {
					return fmt.Errorf("write: %w", err)
				}
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err != nil {
					return fmt.Errorf("read: %w", err)
				}
				c.SetDeadline(time.Time{})
				return nil
			}()
			if err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		return fmt.Errorf("%d of %d connections failed, first: %w", len(errs), o.n, errs[0])
	}
	printJSON(map[string]any{"holding": o.n, "seconds": time.Since(start).Seconds()})
	select {
	case <-ctx.Done():
	case <-time.After(o.hold):
	}
	return nil
}
