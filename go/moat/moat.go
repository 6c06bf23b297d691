// Package moat runs AI agents in isolated containers from Go. It loads and
// validates agent.yaml (LoadConfig, ResolveSecrets), starts moat's
// credential-injecting proxy on its own (StartProxy), and starts, follows,
// waits for, stops and destroys runs (StartRun). It stores and revokes the
// grants runs use (Grant, GrantSSH, GrantAWS, Grants, Revoke), verifies and
// exports audit logs (VerifyAudit, ExportAudit, VerifyBundle), reads a
// run's trace against a policy (TraceHAR, CheckPolicy, SuggestPolicy), and
// keeps a moat home (Promote, Clean, System, Deps).
//
// It is a thin layer over libmoat, the C ABI (include/moat.h), found with
// pkg-config: install the library with
//
//	bash scripts/install-lib.sh --prefix PREFIX
//
// and build with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig. Runs need the `moat`
// program, which the library finds in PREFIX/bin. See docs/c-and-go.md.
//
// Errors from libmoat are *Error values: a Status and every problem with
// its file, line and column. Test for a status with errors.Is:
//
//	if errors.Is(err, moat.StatusConfig) { ... }
//
// Importing the package ignores SIGPIPE for the whole process: libmoat's
// own threads write to sockets whose peers may have gone, and Go passes a
// SIGPIPE raised on a thread it did not start to the default action, which
// ends the program. Ignored, such a write fails with EPIPE, which libmoat
// handles; so does a write to a closed standard output, which would
// otherwise end a Go program.
package moat

/*
#cgo pkg-config: moat
#include <stdlib.h>
#include <moat.h>
*/
import "C"

import (
	"fmt"
	"os/signal"
	"syscall"
	"unsafe"
)

func init() {
	signal.Ignore(syscall.SIGPIPE)
}

// Version is the version of the libmoat in use, such as "0.1.0".
func Version() string {
	return C.GoString(C.moat_version())
}

// Status says what kind of failure an Error is. The values are libmoat's
// (moat_status) and stable.
type Status int

// The statuses of libmoat's failures.
const (
	// StatusConfig: a configuration file or override is invalid.
	StatusConfig Status = C.MOAT_ERR_CONFIG
	// StatusIO: reading or writing a file failed.
	StatusIO Status = C.MOAT_ERR_IO
	// StatusInvalidArgument: an argument is invalid.
	StatusInvalidArgument Status = C.MOAT_ERR_INVALID_ARGUMENT
	// StatusInternal: a bug in moat.
	StatusInternal Status = C.MOAT_ERR_INTERNAL
	// StatusPanic: a panic inside moat, caught (a bug in moat).
	StatusPanic Status = C.MOAT_ERR_PANIC
	// StatusRuntime: the container engine is unreachable or refused, or a
	// run could not be set up or managed.
	StatusRuntime Status = C.MOAT_ERR_RUNTIME
)

// String names the status: "config", "io", "invalid argument", "internal",
// "panic" or "runtime".
func (s Status) String() string {
	switch s {
	case StatusConfig:
		return "config"
	case StatusIO:
		return "io"
	case StatusInvalidArgument:
		return "invalid argument"
	case StatusInternal:
		return "internal"
	case StatusPanic:
		return "panic"
	case StatusRuntime:
		return "runtime"
	}
	return fmt.Sprintf("status %d", int(s))
}

// Error makes a Status usable as the target of errors.Is.
func (s Status) Error() string {
	return "moat: " + s.String() + " error"
}

// Problem is one problem of an Error: for a configuration, one mistake in
// the file.
type Problem struct {
	// Message says what is wrong, without the location.
	Message string
	// Path is the file the problem is in, or "" when it has no location.
	Path string
	// Line and Column are 1-based, or 0 when the problem has no location.
	Line, Column int
}

// String is the problem as moat prints it: "path:line:column: message"
// when it has a location.
func (p Problem) String() string {
	if p.Path == "" {
		return p.Message
	}
	return fmt.Sprintf("%s:%d:%d: %s", p.Path, p.Line, p.Column, p.Message)
}

// Error is a failure reported by libmoat.
type Error struct {
	// Status is the kind of failure.
	Status Status
	// Message is the whole message: every problem, one a line, each
	// prefixed with its location.
	Message string
	// Problems holds every problem (at least one), the first being the
	// headline.
	Problems []Problem
}

func (e *Error) Error() string {
	return e.Message
}

// Is reports whether target is e's Status, for errors.Is.
func (e *Error) Is(target error) bool {
	s, ok := target.(Status)
	return ok && s == e.Status
}

// takeError turns a moat_error into an *Error and frees it.
func takeError(status C.moat_status, e *C.moat_error) error {
	if e == nil {
		return &Error{
			Status:   Status(status),
			Message:  Status(status).Error(),
			Problems: []Problem{{Message: Status(status).Error()}},
		}
	}
	defer C.moat_error_free(e)
	err := &Error{
		Status:  Status(C.moat_error_status(e)),
		Message: C.GoString(C.moat_error_message(e)),
	}
	n := int(C.moat_error_count(e))
	for i := 0; i < n; i++ {
		idx := C.size_t(i)
		p := Problem{
			Message: C.GoString(C.moat_error_item_message(e, idx)),
			Line:    int(C.moat_error_item_line(e, idx)),
			Column:  int(C.moat_error_item_column(e, idx)),
		}
		if path := C.moat_error_item_path(e, idx); path != nil {
			p.Path = C.GoString(path)
		}
		err.Problems = append(err.Problems, p)
	}
	if len(err.Problems) == 0 {
		err.Problems = []Problem{{Message: err.Message}}
	}
	return err
}

// call runs a fallible libmoat function and converts its failure.
func call(f func(out **C.moat_error) C.moat_status) error {
	var e *C.moat_error
	if status := f(&e); status != C.MOAT_OK {
		return takeError(status, e)
	}
	return nil
}

// cstrings holds C copies of Go strings until free.
type cstrings []*C.char

func (c *cstrings) of(s string) *C.char {
	p := C.CString(s)
	*c = append(*c, p)
	return p
}

// orNull is of(s), or NULL for "".
func (c *cstrings) orNull(s string) *C.char {
	if s == "" {
		return nil
	}
	return c.of(s)
}

func (c *cstrings) free() {
	for _, p := range *c {
		C.free(unsafe.Pointer(p))
	}
	*c = nil
}

// takeString copies a string moat returned through a char ** and frees it.
func takeString(s *C.char) string {
	if s == nil {
		return ""
	}
	defer C.moat_string_free(s)
	return C.GoString(s)
}
