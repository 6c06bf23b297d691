package moat

/*
#include <stdint.h>
#include <moat.h>

extern int moatGoOutput(void *user, char *stream, uint8_t *data, size_t len);

static int moat_go_output(void *user, const char *stream, const uint8_t *data, size_t len) {
	return moatGoOutput(user, (char *)stream, (uint8_t *)data, len);
}

static moat_status moat_go_follow(const moat_run *run, uintptr_t user, moat_error **out_error) {
	return moat_run_follow(run, moat_go_output, (void *)user, out_error);
}
*/
import "C"

import (
	"context"
	"encoding/json"
	"io"
	"runtime/cgo"
	"time"
)

// RunOptions configures StartRun. Fields left empty take agent.yaml's value
// (the workspace's), else moat's default.
type RunOptions struct {
	// Workspace is the directory mounted at /workspace ("." when "").
	Workspace string
	// Image is the container image.
	Image string
	// Name is the run's name (generated when "").
	Name string
	// Policy is "permissive" or "strict".
	Policy string
	// Runtime is the container engine: "docker" or "podman".
	Runtime string
	// Home is the moat home ($MOAT_HOME, else ~/.moat, when "").
	Home string
	// Supervisor is the `moat` program that supervises the run. When "":
	// $MOAT_SUPERVISOR, else moat beside the program, else the one
	// installed with libmoat (PREFIX/bin/moat), else moat on PATH.
	Supervisor string
	// Command replaces agent.yaml's command.
	Command []string
	// Env holds KEY=VALUE pairs set in the container (their values are
	// never recorded).
	Env []string
	// Grants are the grants whose credentials the run's proxy injects
	// ("github", "ssh:HOST", ...).
	Grants []string
	// Allow holds strict mode's further host patterns.
	Allow []string
}

// Run is one container execution and its artifacts. It holds no resource
// of its own: every method reads the run's state from the moat home, so a
// Run may be used from several goroutines (Wait in one, Stop in another).
type Run struct {
	id, name, dir, home string
}

// RunInfo is what is known about a run (its run.json).
type RunInfo struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	State string `json:"state"` // starting, running, stopped or failed
	Image string `json:"image"`
	// Engine is "docker" or "podman".
	Engine string `json:"engine"`
	// ExitCode is the command's exit code, nil until it has one.
	ExitCode *int64 `json:"exit_code"`
	// Error says what went wrong, if anything.
	Error string `json:"error"`
	// URLs are the run's endpoints through the routing proxy.
	URLs map[string]string `json:"urls"`
	// Raw is the whole document.
	Raw json.RawMessage `json:"-"`
}

// StartRun starts a run and returns once its container has started, or
// with the reason it could not (a missing grant, an engine that does not
// answer, an image that cannot be pulled, strict mode that cannot be
// enforced).
func StartRun(opts RunOptions) (*Run, error) {
	var cs cstrings
	defer cs.free()
	options := C.moat_run_options_new(cs.orNull(opts.Workspace))
	if options == nil {
		return nil, &Error{Status: StatusInvalidArgument, Message: "moat: invalid workspace",
			Problems: []Problem{{Message: "moat: invalid workspace"}}}
	}
	defer C.moat_run_options_free(options)
	set := func(key, value string) error {
		if value == "" {
			return nil
		}
		return call(func(e **C.moat_error) C.moat_status {
			return C.moat_run_options_set(options, cs.of(key), cs.of(value), e)
		})
	}
	add := func(key string, values []string) error {
		for _, value := range values {
			var v cstrings
			err := call(func(e **C.moat_error) C.moat_status {
				return C.moat_run_options_add(options, cs.of(key), v.of(value), e)
			})
			v.free()
			if err != nil {
				return err
			}
		}
		return nil
	}
	for _, err := range []error{
		set("image", opts.Image), set("name", opts.Name), set("policy", opts.Policy),
		set("runtime", opts.Runtime), set("home", opts.Home), set("supervisor", opts.Supervisor),
		add("arg", opts.Command), add("env", opts.Env), add("grant", opts.Grants), add("allow", opts.Allow),
	} {
		if err != nil {
			return nil, err
		}
	}
	var handle *C.moat_run
	err := call(func(e **C.moat_error) C.moat_status {
		return C.moat_run_start(options, &handle, e)
	})
	if err != nil {
		return nil, err
	}
	defer C.moat_run_free(handle)
	return runOf(handle, opts.Home), nil
}

// OpenRun opens an existing run by id, id prefix or name ("" for the most
// recent) in the moat home home ("" for the default).
func OpenRun(reference, home string) (*Run, error) {
	handle, err := open(reference, home)
	if err != nil {
		return nil, err
	}
	defer C.moat_run_free(handle)
	return runOf(handle, home), nil
}

func runOf(handle *C.moat_run, home string) *Run {
	return &Run{
		id:   C.GoString(C.moat_run_id(handle)),
		name: C.GoString(C.moat_run_name(handle)),
		dir:  C.GoString(C.moat_run_dir(handle)),
		home: home,
	}
}

func open(reference, home string) (*C.moat_run, error) {
	var cs cstrings
	defer cs.free()
	var handle *C.moat_run
	err := call(func(e **C.moat_error) C.moat_status {
		return C.moat_run_open(cs.orNull(reference), cs.orNull(home), &handle, e)
	})
	return handle, err
}

// with runs f on a handle of its own for r.
func (r *Run) with(f func(*C.moat_run) error) error {
	handle, err := open(r.id, r.home)
	if err != nil {
		return err
	}
	defer C.moat_run_free(handle)
	return f(handle)
}

// ID is the run's id (run_ and 12 hex digits).
func (r *Run) ID() string { return r.id }

// Name is the run's name.
func (r *Run) Name() string { return r.name }

// Dir is the run's directory of artifacts (logs, network trace, audit log).
func (r *Run) Dir() string { return r.dir }

// Follow writes the run's output, from its start, to stdout and stderr
// (moat's own notes go to stderr too) until the run ends. A nil writer
// discards its stream; a writer's error stops following and is returned.
func (r *Run) Follow(stdout, stderr io.Writer) error {
	out := &output{stdout: stdout, stderr: stderr}
	h := cgo.NewHandle(out)
	defer h.Delete()
	err := r.with(func(handle *C.moat_run) error {
		return call(func(e **C.moat_error) C.moat_status {
			return C.moat_go_follow(handle, C.uintptr_t(h), e)
		})
	})
	if out.err != nil {
		return out.err
	}
	return err
}

// output is where Follow's callback writes.
type output struct {
	stdout, stderr io.Writer
	err            error
}

// How long one wait in C lasts before Wait looks at its context again.
const waitSlice = 200 * time.Millisecond

// Wait waits for the run to end and returns its exit code (-1 when it has
// none: it failed before its command ran). It returns ctx's error when ctx
// ends first; the run goes on.
func (r *Run) Wait(ctx context.Context) (int, error) {
	timeout := C.int64_t(-1)
	if ctx.Done() != nil {
		timeout = C.int64_t(waitSlice / time.Millisecond)
	}
	for {
		if err := ctx.Err(); err != nil {
			return -1, err
		}
		var done C.bool
		var code C.int64_t
		err := r.with(func(handle *C.moat_run) error {
			return call(func(e **C.moat_error) C.moat_status {
				return C.moat_run_wait(handle, timeout, &done, &code, e)
			})
		})
		if err != nil {
			return -1, err
		}
		if done {
			return int(code), nil
		}
	}
}

// Stop stops the run: SIGTERM, then SIGKILL after grace (rounded up to a
// second); it returns once the run has ended.
func (r *Run) Stop(grace time.Duration) error {
	secs := C.uint32_t((grace + time.Second - 1) / time.Second)
	return r.with(func(handle *C.moat_run) error {
		return call(func(e **C.moat_error) C.moat_status {
			return C.moat_run_stop(handle, secs, e)
		})
	})
}

// Info is what is known about the run now.
func (r *Run) Info() (*RunInfo, error) {
	raw, err := r.document(C.MOAT_RUN_INFO)
	if err != nil {
		return nil, err
	}
	info := &RunInfo{Raw: raw}
	return info, json.Unmarshal(raw, info)
}

// Trace is the run's network trace: one object per request.
func (r *Run) Trace() ([]map[string]any, error) {
	raw, err := r.document(C.MOAT_RUN_TRACE)
	if err != nil {
		return nil, err
	}
	var records []map[string]any
	return records, json.Unmarshal(raw, &records)
}

func (r *Run) document(doc C.int) (json.RawMessage, error) {
	var text *C.char
	err := r.with(func(handle *C.moat_run) error {
		return call(func(e **C.moat_error) C.moat_status {
			return C.moat_run_json(handle, doc, &text, e)
		})
	})
	if err != nil {
		return nil, err
	}
	return json.RawMessage(takeString(text)), nil
}

// Destroy removes the run and its artifacts, stopping it first.
func (r *Run) Destroy() error {
	return r.with(func(handle *C.moat_run) error {
		return call(func(e **C.moat_error) C.moat_status {
			return C.moat_run_destroy(handle, e)
		})
	})
}
