package moat

/*
#include <stdbool.h>
#include <moat.h>
*/
import "C"

import "encoding/json"

// CleanOptions configures Clean.
type CleanOptions struct {
	// Home is the moat home ($MOAT_HOME, else ~/.moat, when "").
	Home string
	// DryRun removes nothing: Clean says what it would remove.
	DryRun bool
	// KeepImages leaves the images moat built, used or not.
	KeepImages bool
}

// Cleaned is what Clean removed (or, with DryRun, would remove).
type Cleaned struct {
	// Runs are the ids of the stopped and failed runs whose artifacts
	// went.
	Runs []string `json:"runs"`
	// Images are the images this home's runs made that nothing uses: their
	// tags, else their ids.
	Images []string `json:"images"`
	// Containers are the containers of this home's runs that no live run
	// owned.
	Containers []string `json:"containers"`
	// Networks are the networks of this home's runs that no live run
	// owned.
	Networks []string `json:"networks"`
	// Firewall are the runs whose firewall chains outlived their network
	// (any moat home's).
	Firewall []string `json:"firewall"`
}

// Clean removes the moat home's stopped and failed runs (their
// directories: Promote a run first to keep it), the images moat built
// that nothing uses (unless KeepImages), and whatever runs left behind on
// the engines, as `moat clean -f` does. Runs still going, and other homes'
// runs, are left alone.
func Clean(opts CleanOptions) (*Cleaned, error) {
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_clean_json(cs.orNull(opts.Home), C.bool(opts.DryRun), C.bool(opts.KeepImages), out, e)
	})
	if err != nil {
		return nil, err
	}
	cleaned := &Cleaned{}
	return cleaned, decode("moat_clean_json", raw, cleaned)
}

// Promoted is what Promote copied; the same document is written to the
// destination as promoted.json.
type Promoted struct {
	// Format is "moat-promoted/1".
	Format string `json:"format"`
	// Run is the run's id.
	Run string `json:"run"`
	// Name is the run's name.
	Name string `json:"name"`
	// Dir is where the artifacts are now.
	Dir string `json:"dir"`
	// PromotedAt is when they were copied (RFC 3339).
	PromotedAt string `json:"promoted_at"`
	// Workspace is the run's workspace.
	Workspace string `json:"workspace"`
	// WorkspaceChanges says what moat knows of the workspace's changes:
	// nothing, it keeps no record of them.
	WorkspaceChanges string `json:"workspace_changes"`
	// Files are the files copied, the bundle among them.
	Files []PromotedFile `json:"files"`
	// Bundle is the proof bundle's file name (audit-bundle.json), or ""
	// when none was made.
	Bundle string `json:"bundle"`
	// BundleProblem says why there is no bundle (no audit log, no signed
	// checkpoint, a log that does not verify), or "".
	BundleProblem string `json:"bundle_problem"`
	// Raw is the whole document.
	Raw json.RawMessage `json:"-"`
}

// PromotedFile is a file of a promoted run.
type PromotedFile struct {
	// Name is its name in the promoted directory.
	Name string `json:"name"`
	// Bytes is its size.
	Bytes uint64 `json:"bytes"`
	// SHA256 is its SHA-256, in hex.
	SHA256 string `json:"sha256"`
}

// Promote copies a run that is over (its id, an id prefix or its name; ""
// for the most recent) in the moat home home ("" for the default) to to (a
// new or empty directory; "" for $MOAT_HOME/promoted/RUN-ID/), where
// Destroy and Clean leave it, as `moat promote` does: its records, a proof
// bundle of its audit log and promoted.json. A run still going, or a
// destination that is not empty or is under the home's runs, is an *Error
// with StatusInvalidArgument.
func Promote(run, to, home string) (*Promoted, error) {
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_promote_json(cs.orNull(run), cs.orNull(to), cs.orNull(home), out, e)
	})
	if err != nil {
		return nil, err
	}
	promoted := &Promoted{Raw: raw}
	return promoted, decode("moat_promote_json", raw, promoted)
}

// System lists what moat owns on the container engines present, as `moat
// system images --json` or `moat system containers --json` prints it:
// what is "images" (the images moat's runs built, with what uses each) or
// "containers" (the containers of runs, running or not); the moat home
// home's ("" for the default), or every home's with allHomes. Any other
// what is an *Error with StatusInvalidArgument.
//
// The document is a JSON array, returned as it is: its fields are those of
// the command's --json output, which the C API does not fix.
func System(what string, allHomes bool, home string) (json.RawMessage, error) {
	var cs cstrings
	defer cs.free()
	return callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_system_json(cs.of(what), C.bool(allHomes), cs.orNull(home), out, e)
	})
}

// Deps describes the dependencies agent.yaml's `dependencies:` may name:
// with name "", all of them (a JSON array, as `moat deps list --json`
// prints it); else the one named, "node" or "node@20" (a JSON object, as
// `moat deps info --json` prints it). An unknown name is an *Error with
// StatusInvalidArgument naming the known ones.
//
// The document is returned as it is: its fields are those of the
// command's --json output, which the C API does not fix.
func Deps(name string) (json.RawMessage, error) {
	var cs cstrings
	defer cs.free()
	return callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_deps_json(cs.orNull(name), out, e)
	})
}
