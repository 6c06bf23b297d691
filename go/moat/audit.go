package moat

/*
#include <moat.h>
*/
import "C"

import (
	"encoding/json"
	"fmt"
)

// AuditReport is what verifying an audit log or a proof bundle found
// (`moat audit --json`; docs/audit-format.md says what is checked).
type AuditReport struct {
	// OK is true: a log or bundle that does not verify is an error.
	OK bool `json:"ok"`
	// Entries is how many complete entries there are.
	Entries uint64 `json:"entries"`
	// Types are the entry types and their counts, in first-seen order.
	Types []AuditTypeCount `json:"types"`
	// FirstTime and LastTime are the times of the first and last entry
	// (RFC 3339), "" when there is none.
	FirstTime string `json:"first_time"`
	// LastTime is the time of the last entry.
	LastTime string `json:"last_time"`
	// Checkpoints are the verified signed checkpoints, oldest first.
	Checkpoints []AuditCheckpoint `json:"checkpoints"`
	// VKey is the verifier key used ("moat+..."): compare it with the key
	// you trust, or pass it to VerifyBundle.
	VKey string `json:"vkey"`
	// Root is the tree head over all entries (hex).
	Root string `json:"root"`
	// TornTail is a torn last line (a crash while writing), or "".
	TornTail string `json:"torn_tail"`
	// Unsigned is how many entries lie past the last signed checkpoint
	// (every entry when there is none): no signature covers them.
	Unsigned uint64 `json:"unsigned"`
	// Closed is true when the last checkpoint is final and covers every
	// entry: the log's writer closed it.
	Closed bool `json:"closed"`
	// Problems are every problem found, the first bad entry first.
	Problems []string `json:"problems"`
	// Raw is the whole document.
	Raw json.RawMessage `json:"-"`
}

// AuditTypeCount is how many entries of one type a log holds.
type AuditTypeCount struct {
	// Type is the entry type ("run_started", "credential_injected", ...).
	Type string
	// Count is how many entries have it.
	Count uint64
}

// UnmarshalJSON reads the pair ["type", count] moat writes.
func (t *AuditTypeCount) UnmarshalJSON(data []byte) error {
	var pair []json.RawMessage
	if err := json.Unmarshal(data, &pair); err != nil {
		return err
	}
	if len(pair) != 2 {
		return fmt.Errorf("an entry type count is not a [type, count] pair: %s", data)
	}
	if err := json.Unmarshal(pair[0], &t.Type); err != nil {
		return err
	}
	return json.Unmarshal(pair[1], &t.Count)
}

// MarshalJSON writes the pair ["type", count], as moat does.
func (t AuditTypeCount) MarshalJSON() ([]byte, error) {
	return json.Marshal([]any{t.Type, t.Count})
}

// AuditCheckpoint is a signed checkpoint of an audit log.
type AuditCheckpoint struct {
	// Origin is the log's origin line ("moat/RUN").
	Origin string `json:"origin"`
	// Size is how many entries it signs.
	Size uint64 `json:"size"`
	// Root is the tree head it signs (hex).
	Root string `json:"root"`
	// Time is when it was signed (RFC 3339).
	Time string `json:"time"`
	// Final is true for the checkpoint signed when the log was closed.
	Final bool `json:"final"`
	// Reopened is true for the checkpoint signed when a closed log was
	// opened again.
	Reopened bool `json:"reopened"`
	// Note is the whole signed note.
	Note string `json:"note"`
}

// VerifyAudit verifies the tamper-evident audit log in dir (a run's Dir, or
// a proxy's AuditDir): its chain, tree, checkpoint signatures and this
// host's witness. vkey is the verifier key to trust ("moat+..."); when "",
// the key of the moat home home ("" for the default). A log that does not
// verify is an *Error with StatusConfig naming the first bad entry, as is
// a home that signed nothing; a directory without a log is StatusIO, a
// vkey that does not parse StatusInvalidArgument.
func VerifyAudit(dir, home, vkey string) (*AuditReport, error) {
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_audit_verify(cs.of(dir), cs.orNull(home), cs.orNull(vkey), out, e)
	})
	if err != nil {
		return nil, err
	}
	report := &AuditReport{Raw: raw}
	return report, decode("moat_audit_verify", raw, report)
}

// ExportAudit writes a proof bundle of the audit log in dir to path: the
// entries with their signed checkpoints and proofs, for VerifyBundle (or
// `moat verify-bundle`) to check offline. The log must verify with the key
// of the moat home home ("" for the default) and have a signed checkpoint.
func ExportAudit(dir, home, path string) error {
	var cs cstrings
	defer cs.free()
	return call(func(e **C.moat_error) C.moat_status {
		return C.moat_audit_export(cs.of(dir), cs.orNull(home), cs.of(path), e)
	})
}

// VerifyBundle verifies a proof bundle offline, with the key it names;
// when vkey is not "", that key must be vkey. A bundle that does not
// verify, or is signed by another key, is an *Error with StatusConfig; a
// file that is not a bundle, or a vkey that is not a verifier key, is
// StatusInvalidArgument.
func VerifyBundle(path, vkey string) (*AuditReport, error) {
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_verify_bundle(cs.of(path), cs.orNull(vkey), out, e)
	})
	if err != nil {
		return nil, err
	}
	report := &AuditReport{Raw: raw}
	return report, decode("moat_verify_bundle", raw, report)
}
