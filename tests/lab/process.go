package lab

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
)

// stopGrace is how long Stop waits after SIGTERM before it sends SIGKILL.
const stopGrace = 3 * time.Second

// Process is a command the lab started in a pod or on a node. It runs in its
// own process group and is stopped by its PID, never by name.
type Process struct {
	lab   *Lab
	where string
	cmd   *exec.Cmd
	out   syncBuffer
	done  chan struct{}
	err   error
}

// PID returns the process ID.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns its error, with its output
// when it failed.
func (p *Process) Wait() error {
	<-p.done
	return p.err
}

// Output returns what the process wrote to stdout and stderr so far.
func (p *Process) Output() string { return p.out.String() }

// Stop sends SIGTERM to the process group, then SIGKILL after a grace
// period, and waits for the process to exit. A process that exited already
// is left alone. Stop reports only failures to stop, not the exit status.
func (p *Process) Stop() error {
	defer p.lab.forget(p)
	select {
	case <-p.done:
		return nil
	default:
	}
	pgid := p.PID()
	if err := syscall.Kill(-pgid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("lab: stop %s pid %d: %w", p.where, pgid, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(stopGrace):
	}
	if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("lab: kill %s pid %d: %w", p.where, pgid, err)
	}
	<-p.done
	return nil
}

// Signal sends sig to the process (not its group).
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

func (l *Lab) forget(p *Process) {
	l.mu.Lock()
	delete(l.procs, p.PID())
	l.mu.Unlock()
}

// start forks name inside ns from a thread that joined it, straight into the
// cgroup at cgPath (clone3 CLONE_INTO_CGROUP), so the child never runs
// outside the pod, not even for an instant.
func (l *Lab) start(ns netns.NsHandle, cgPath, where, name string, args []string) (*Process, error) {
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("lab: start %s in %s: lab is closed", name, where)
	}
	cg, err := os.Open(cgPath)
	if err != nil {
		return nil, fmt.Errorf("lab: open cgroup of %s: %w", where, err)
	}
	defer cg.Close()

	p := &Process{lab: l, where: where, done: make(chan struct{})}
	p.cmd = exec.Command(name, args...)
	p.cmd.Stdout = &p.out
	p.cmd.Stderr = &p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:     true,
		UseCgroupFD: true,
		CgroupFD:    int(cg.Fd()),
	}
	if err := inNetNS(ns, p.cmd.Start); err != nil {
		return nil, fmt.Errorf("lab: start %s in %s: %w", name, where, err)
	}
	l.mu.Lock()
	l.procs[p.PID()] = p
	l.mu.Unlock()
	go func() {
		err := p.cmd.Wait()
		if err != nil {
			p.err = fmt.Errorf("%s in %s (pid %d): %w\n%s", name, where, p.PID(), err, p.out.String())
		}
		close(p.done)
	}()
	return p, nil
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a child's
// stdout and stderr and reads by the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
