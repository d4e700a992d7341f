package fdstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
)

// DefaultTimeout bounds a Client call whose context has no deadline.
const DefaultTimeout = 5 * time.Second

// ErrClientClosed is returned by calls on a closed Client.
var ErrClientClosed = errors.New("fdstore client closed")

// Client talks to the holder at a path. Its methods are safe for concurrent
// use (calls are serialised on one connection). A connection that breaks
// is replaced on the next call, and a call on a connection that had been
// idle is retried once on a new one, since every operation is idempotent. A
// holder that is being taken over or has been superseded is left for the
// one at the path, with retries until the call's context ends.
type Client struct {
	path string

	mu      sync.Mutex
	timeout time.Duration
	conn    *rawConn
	holder  *HolderInfo
	closed  bool
}

// Entry is one held fd, as GetPrefix returns it.
type Entry struct {
	Key  string
	File *os.File
}

// Dial connects to the holder at path and greets it.
func Dial(ctx context.Context, path string) (*Client, error) {
	c := &Client{path: path, timeout: DefaultTimeout}
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	for attempt := 0; ; attempt++ {
		err := c.connectLocked(ctx)
		if err == nil {
			return c, nil
		}
		if !retryable(err) || sleepCtx(ctx, backoff(attempt)) != nil {
			return nil, fmt.Errorf("fdstore dial %s: %w", path, err)
		}
	}
}

// SetTimeout sets the bound of a call whose context has no deadline
// (DefaultTimeout until set).
func (c *Client) SetTimeout(d time.Duration) {
	c.mu.Lock()
	c.timeout = d
	c.mu.Unlock()
}

// Path is the socket path the client dials.
func (c *Client) Path() string { return c.path }

// Holder describes the holder the client is connected to, as it said when
// the connection was made; nil while disconnected. Its ID changes when the
// client reaches another holder, which may lack what was put to the old one.
func (c *Client) Holder() *HolderInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.holder
}

// Close closes the connection; later calls fail with ErrClientClosed. The
// holder keeps everything put.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.dropLocked()
	return nil
}

func (c *Client) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	c.mu.Lock()
	d := c.timeout
	c.mu.Unlock()
	return context.WithTimeout(ctx, d)
}

func (c *Client) connectLocked(ctx context.Context) error {
	rc, err := dialRaw(ctx, c.path)
	if err != nil {
		return err
	}
	info, err := rc.hello(ctx)
	if err == nil && info.SupersededBy != nil {
		err = &Error{Code: codeSuperseded, Holder: info.SupersededBy, Message: fmt.Sprintf("superseded by %s", info.SupersededBy)}
	}
	if err != nil {
		rc.close()
		return err
	}
	c.conn, c.holder = rc, info
	return nil
}

func (c *Client) dropLocked() {
	if c.conn != nil {
		c.conn.close()
		c.conn = nil
	}
	c.holder = nil
}

// retryable: the holder at hand is being replaced; the path leads to its
// successor (at once, or once the take-over ends).
func retryable(err error) bool {
	return errors.Is(err, ErrSuperseded) || errors.Is(err, ErrTakeover)
}

// do runs fn on a connection, reconnecting and retrying as the Client
// documentation says.
func (c *Client) do(ctx context.Context, fn func(context.Context, *rawConn) error) error {
	ctx, cancel := c.withTimeout(ctx)
	defer cancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	redirected := false // a holder sent us to the path
	for attempt := 0; ; attempt++ {
		if c.closed {
			return ErrClientClosed
		}
		fresh := false
		if c.conn == nil {
			if err := c.connectLocked(ctx); err != nil {
				// While holders change places the path may briefly lead
				// nowhere (a new holder died after taking it, and the old
				// one takes it back): keep trying then.
				if (retryable(err) || redirected) && sleepCtx(ctx, backoff(attempt)) == nil {
					redirected = true
					continue
				}
				return err
			}
			fresh = true
		}
		err := fn(ctx, c.conn)
		var re *Error
		switch {
		case err == nil:
			return nil
		case retryable(err):
			redirected = true
			c.dropLocked()
			if sleepCtx(ctx, backoff(attempt)) != nil {
				return err
			}
		case errors.As(err, &re):
			// The holder answered: the connection is in step, unless the
			// holder closes it after this kind of answer.
			if errors.Is(err, ErrTooLarge) || errors.Is(err, ErrForbidden) || errors.Is(err, ErrBusy) || errors.Is(err, ErrClosing) {
				c.dropLocked()
			}
			return err
		default:
			c.dropLocked()
			if fresh || attempt > 0 || ctx.Err() != nil {
				return err
			}
			// The connection was from an earlier call: the holder may have
			// restarted since. Once more on a new one.
		}
	}
}

// Put hands the holder a copy of c's fd under key, replacing (and closing)
// any fd held under it. c is typically a *net.TCPListener or an *os.File;
// it stays the caller's.
func (c *Client) Put(ctx context.Context, key string, conn syscall.Conn) error {
	if err := validKey(key); err != nil {
		return fmt.Errorf("fdstore put %s: %w", key, err)
	}
	sc, err := conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("fdstore put %s: %w", key, err)
	}
	err = c.do(ctx, func(ctx context.Context, rc *rawConn) error {
		var rerr error
		// The fd stays open while Control runs.
		if cerr := sc.Control(func(fd uintptr) {
			rerr = rc.roundTrip(ctx, &request{Op: opPut, Key: key}, []int{int(fd)}, func(_ *reply, fds []int) error {
				closeFDs(fds)
				return nil
			})
		}); cerr != nil {
			return cerr
		}
		return rerr
	})
	if err != nil {
		return fmt.Errorf("fdstore put %s: %w", key, err)
	}
	return nil
}

// Get returns a copy of the fd held under key; the caller closes it. The
// error matches ErrNotFound if none is held.
func (c *Client) Get(ctx context.Context, key string) (*os.File, error) {
	var f *os.File
	err := c.do(ctx, func(ctx context.Context, rc *rawConn) error {
		return rc.roundTrip(ctx, &request{Op: opGet, Key: key}, nil, func(r *reply, fds []int) error {
			if len(fds) != 1 || len(r.Keys) != 1 || r.Keys[0] != key || f != nil {
				closeFDs(fds)
				return fmt.Errorf("protocol error: get reply with %d fds for %q", len(fds), r.Keys)
			}
			f = os.NewFile(uintptr(fds[0]), key)
			return nil
		})
	})
	if err != nil {
		if f != nil {
			f.Close()
		}
		return nil, fmt.Errorf("fdstore get %s: %w", key, err)
	}
	return f, nil
}

// GetPrefix returns copies of every fd held under a key starting with
// prefix, sorted by key; the caller closes them.
func (c *Client) GetPrefix(ctx context.Context, prefix string) ([]Entry, error) {
	var out []Entry
	err := c.do(ctx, func(ctx context.Context, rc *rawConn) error {
		closeEntries(out)
		out = out[:0]
		return rc.roundTrip(ctx, &request{Op: opGetPrefix, Prefix: prefix}, nil, func(r *reply, fds []int) error {
			if len(fds) != len(r.Keys) {
				closeFDs(fds)
				return fmt.Errorf("protocol error: %d keys for %d fds", len(r.Keys), len(fds))
			}
			for i, k := range r.Keys {
				out = append(out, Entry{Key: k, File: os.NewFile(uintptr(fds[i]), k)})
			}
			return nil
		})
	})
	if err != nil {
		closeEntries(out)
		return nil, fmt.Errorf("fdstore get_prefix %s: %w", prefix, err)
	}
	return out, nil
}

func closeEntries(es []Entry) {
	for _, e := range es {
		e.File.Close()
	}
}

// Delete drops and closes the fd held under key; a missing key is no error.
func (c *Client) Delete(ctx context.Context, key string) error {
	err := c.do(ctx, func(ctx context.Context, rc *rawConn) error {
		return rc.roundTrip(ctx, &request{Op: opDelete, Key: key}, nil, func(_ *reply, fds []int) error {
			closeFDs(fds)
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("fdstore delete %s: %w", key, err)
	}
	return nil
}

// DeletePrefix drops and closes every fd held under a key starting with
// prefix and returns how many it dropped.
func (c *Client) DeletePrefix(ctx context.Context, prefix string) (int, error) {
	var n int
	err := c.do(ctx, func(ctx context.Context, rc *rawConn) error {
		return rc.roundTrip(ctx, &request{Op: opDeletePrefix, Prefix: prefix}, nil, func(r *reply, fds []int) error {
			closeFDs(fds)
			n = r.Count
			return nil
		})
	})
	if err != nil {
		return 0, fmt.Errorf("fdstore delete_prefix %s: %w", prefix, err)
	}
	return n, nil
}

// List returns the keys held, sorted.
func (c *Client) List(ctx context.Context) ([]string, error) {
	keys, err := c.list(ctx, "")
	if err != nil {
		return nil, fmt.Errorf("fdstore list: %w", err)
	}
	return keys, nil
}

// ListPrefix returns the keys held that start with prefix, sorted.
func (c *Client) ListPrefix(ctx context.Context, prefix string) ([]string, error) {
	keys, err := c.list(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("fdstore list %s: %w", prefix, err)
	}
	return keys, nil
}

func (c *Client) list(ctx context.Context, prefix string) ([]string, error) {
	var keys []string
	err := c.do(ctx, func(ctx context.Context, rc *rawConn) error {
		keys = keys[:0]
		return rc.roundTrip(ctx, &request{Op: opList, Prefix: prefix}, nil, func(r *reply, fds []int) error {
			closeFDs(fds)
			keys = append(keys, r.Keys...)
			return nil
		})
	})
	return keys, err
}

// Info asks the holder the client reaches now to describe itself.
func (c *Client) Info(ctx context.Context) (HolderInfo, error) {
	var info *HolderInfo
	err := c.do(ctx, func(ctx context.Context, rc *rawConn) error {
		var err error
		info, err = rc.hello(ctx)
		if err == nil && info.SupersededBy != nil {
			return &Error{Code: codeSuperseded, Holder: info.SupersededBy, Message: fmt.Sprintf("superseded by %s", info.SupersededBy)}
		}
		if err == nil {
			c.holder = info
		}
		return err
	})
	if err != nil {
		return HolderInfo{}, fmt.Errorf("fdstore info: %w", err)
	}
	return *info, nil
}
