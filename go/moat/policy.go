package moat

/*
#include <stddef.h>
#include <moat.h>
*/
import "C"

// PolicyCheck is what CheckPolicy found.
type PolicyCheck struct {
	// Run is the run's id.
	Run string `json:"run"`
	// Requests is how many requests were replayed (CONNECTs and moat's
	// own requests aside).
	Requests int `json:"requests"`
	// Changes are the requests the current policy would decide otherwise,
	// in the run's order; empty when none.
	Changes []PolicyChange `json:"changes"`
}

// PolicyChange is a request whose decision would change.
type PolicyChange struct {
	// Method and URL are the request's.
	Method string `json:"method"`
	// URL is the request's URL.
	URL string `json:"url"`
	// Then is "allowed" or "denied", as the run's proxy decided.
	Then string `json:"then"`
	// Now is "allowed" or "denied", as the current policy would decide.
	Now string `json:"now"`
	// Rule is what would decide now: a request rule, "strict",
	// "allow:HOST", ...
	Rule string `json:"rule"`
}

// CheckPolicy replays the requests of a run (its id, an id prefix or its
// name; "" for the most recent) in the moat home home ("" for the default)
// against its workspace's current policy (its agent.yaml now, and the
// hosts of the run's grants), as `moat policy check` does. A run that
// matches nothing is an *Error with StatusInvalidArgument.
func CheckPolicy(run, home string) (*PolicyCheck, error) {
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_policy_check_json(cs.orNull(run), cs.orNull(home), out, e)
	})
	if err != nil {
		return nil, err
	}
	check := &PolicyCheck{}
	return check, decode("moat_policy_check_json", raw, check)
}

// SuggestPolicy proposes a strict network policy under which a run (its
// id, an id prefix or its name; "" for the most recent) in the moat home
// home ("" for the default) would have made all its requests, as `moat
// policy suggest` does: the YAML of a `network:` section for agent.yaml,
// with comments. It allows what the agent did, not what it should do:
// review it.
func SuggestPolicy(run, home string) (string, error) {
	var cs cstrings
	defer cs.free()
	return callString(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_policy_suggest(cs.orNull(run), cs.orNull(home), out, e)
	})
}

// TraceHAR writes the network trace of a run (its id, an id prefix or its
// name; "" for the most recent) in the moat home home ("" for the default)
// to path as HAR 1.2, readable by its owner only, with credentials
// redacted, as `moat trace --har` does. It returns how many requests it
// wrote.
func TraceHAR(run, path, home string) (int, error) {
	var cs cstrings
	defer cs.free()
	var entries C.size_t
	err := call(func(e **C.moat_error) C.moat_status {
		return C.moat_trace_har(cs.orNull(run), cs.of(path), cs.orNull(home), &entries, e)
	})
	if err != nil {
		return 0, err
	}
	return int(entries), nil
}
