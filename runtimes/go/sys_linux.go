package edgefn

import (
	"fmt"
	"os"
	"runtime"
	"syscall"
)

// ppidAtStart is read as early as the runtime lets us, so dieWithParent can tell whether the
// parent died before the death signal was armed.
var ppidAtStart = os.Getppid()

// The kernel keeps the parent-death signal per thread, and a Go thread can be retired (when a
// goroutine exits while locked to it) - except the main thread. Package init runs on the main
// thread; keep the main goroutine there until Start has armed the signal on it.
func init() { runtime.LockOSThread() }

// takeStdout keeps the real stdout (the agent's pipe) for frames on a private descriptor and
// points fd 1 and os.Stdout at stderr: fmt.Print*, os.Stdout and child processes that inherit
// fd 1 then write to the agent's log instead of corrupting the frame stream.
func takeStdout() (*os.File, error) {
	// ForkLock: no child may inherit the new descriptor before it is marked close-on-exec.
	syscall.ForkLock.Lock()
	defer syscall.ForkLock.Unlock()
	fd, err := syscall.Dup(1)
	if err != nil {
		return nil, fmt.Errorf("dup stdout: %w", err)
	}
	syscall.CloseOnExec(fd)
	if err := syscall.Dup3(2, 1, 0); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("redirect stdout to stderr: %w", err)
	}
	os.Stdout = os.Stderr
	return os.NewFile(uintptr(fd), "edgefn-frames"), nil
}

// dieWithParent asks the kernel for SIGKILL when the agent dies. The agent already starts us
// under `setpriv --pdeathsig KILL`; this is the second line of defence when it does not.
func dieWithParent() {
	defer runtime.UnlockOSThread()
	_, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0)
	if errno != 0 {
		fmt.Fprintf(os.Stderr, "edgefn: prctl(PR_SET_PDEATHSIG): %v\n", errno)
		return
	}
	if os.Getppid() != ppidAtStart {
		fmt.Fprintln(os.Stderr, "edgefn: the agent exited before the worker started")
		os.Exit(1)
	}
}
