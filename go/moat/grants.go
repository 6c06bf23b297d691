package moat

/*
#include <stdbool.h>
#include <stdint.h>
#include <moat.h>
*/
import "C"

import (
	"encoding/json"
	"fmt"
	"math"
	"time"
)

// callString runs a libmoat function that writes a string (JSON, or
// YAML) through a char **, and returns it; the C copy is freed with
// moat_string_free.
func callString(f func(out **C.char, e **C.moat_error) C.moat_status) (string, error) {
	var text *C.char
	err := call(func(e **C.moat_error) C.moat_status {
		return f(&text, e)
	})
	if err != nil {
		return "", err
	}
	return takeString(text), nil
}

// callJSON is callString for a JSON document.
func callJSON(f func(out **C.char, e **C.moat_error) C.moat_status) (json.RawMessage, error) {
	text, err := callString(f)
	if err != nil {
		return nil, err
	}
	return json.RawMessage(text), nil
}

// invalid is an *Error with StatusInvalidArgument for an argument
// refused before libmoat sees it.
func invalid(message string) *Error {
	return &Error{Status: StatusInvalidArgument, Message: message, Problems: []Problem{{Message: message}}}
}

// decode unmarshals raw into v, an error naming what when it does not fit
// (a libmoat that does not match this package).
func decode(what string, raw json.RawMessage, v any) error {
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("moat: %s: %w", what, err)
	}
	return nil
}

// GrantOptions configures Grant. Token is a secret: String and GoString
// print it as ****.
type GrantOptions struct {
	// Token is the credential to store. When "", it is read from the
	// provider's environment variable (GITHUB_TOKEN or GH_TOKEN,
	// ANTHROPIC_API_KEY, OPENAI_API_KEY, ...), and a missing one is an
	// *Error with StatusInvalidArgument naming the variables.
	Token string
	// Validate checks a GitHub token against api.github.com (GET /user)
	// before storing it and records the login (Grant.Metadata["login"]); a
	// token GitHub rejects is StatusInvalidArgument, an API that cannot be
	// reached StatusIO. Other providers' tokens are not checked.
	Validate bool
	// Home is the moat home ($MOAT_HOME, else ~/.moat, when "").
	Home string
}

// String prints the options without the token.
func (o GrantOptions) String() string {
	return fmt.Sprintf("{Token:**** Validate:%t Home:%s}", o.Validate, o.Home)
}

// GoString prints the options without the token.
func (o GrantOptions) GoString() string {
	return fmt.Sprintf("moat.GrantOptions{Token:\"****\", Validate:%t, Home:%q}", o.Validate, o.Home)
}

// GrantInfo is a stored grant as `moat grant list --json` shows it: never
// the token.
type GrantInfo struct {
	// Provider is the grant's name: "github", "anthropic", a custom
	// provider, "aws", or "ssh:HOST".
	Provider string `json:"provider"`
	// Source is where the token came from: "api" (a token Grant was
	// given), "env:GITHUB_TOKEN", ...; for aws the role, for ssh the
	// agent key.
	Source string `json:"source"`
	// Created is when it was stored (RFC 3339).
	Created string `json:"created"`
	// Expires is when it expires (RFC 3339), or "" when not known.
	Expires string `json:"expires"`
	// Kind is the token kind ("api_key", "oauth", "role", an SSH key
	// type), or "" when the provider has one kind.
	Kind string `json:"kind"`
	// Hosts are the hosts its credential is injected on.
	Hosts []string `json:"hosts"`
	// Metadata holds non-secret facts: the GitHub login, an AWS role's
	// role_arn, region and session_duration, an SSH key's fingerprint.
	Metadata map[string]string `json:"metadata"`
	// Problem says why it cannot be used (it cannot be decrypted, it has
	// expired), or "" when it can.
	Problem string `json:"problem"`
}

// Granted is what Grant stored.
type Granted struct {
	// Grant is the stored grant, without the token.
	Grant GrantInfo `json:"grant"`
	// Path is the encrypted file the token is in.
	Path string `json:"path"`
	// KeyFile is the file holding the store's key when the key is not in
	// the system keyring (as with MOAT_KEYRING_BACKEND=file), else "".
	KeyFile string `json:"key_file"`
	// KeyReason says why KeyFile is used (the keyring's error, or the
	// setting), or "".
	KeyReason string `json:"key_reason"`
	// Raw is the whole document.
	Raw json.RawMessage `json:"-"`
}

// Grant stores a credential for provider ("github", "anthropic", "openai",
// a custom provider) without prompting, for runs and proxies to inject
// (RunOptions.Grants, ProxyOptions.Grants). An unknown provider is an
// *Error with StatusInvalidArgument (suggesting the name meant); "aws" and
// "ssh" store no token: use GrantAWS and GrantSSH.
func Grant(provider string, opts GrantOptions) (*Granted, error) {
	var cs cstrings
	defer cs.free()
	var token cstrings
	defer token.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_grant(cs.of(provider), token.orNull(opts.Token), C.bool(opts.Validate),
			cs.orNull(opts.Home), out, e)
	})
	if err != nil {
		return nil, err
	}
	granted := &Granted{Raw: raw}
	return granted, decode("moat_grant", raw, granted)
}

// SSHKey is a key of an SSH agent.
type SSHKey struct {
	// Fingerprint is "SHA256:..." as `ssh-add -l` prints it.
	Fingerprint string `json:"fingerprint"`
	// Comment is the key's comment (often user@host).
	Comment string `json:"comment"`
	// KeyType is the key's type ("ssh-ed25519", ...).
	KeyType string `json:"key_type"`
}

// SSHGrant is an SSH grant: which key of the user's agent may sign for
// which host.
type SSHGrant struct {
	// Host is the host the key may sign for (lower case, without a
	// trailing dot).
	Host string `json:"host"`
	// Key is the agent key.
	Key SSHKey `json:"key"`
	// Created is when it was granted (RFC 3339).
	Created string `json:"created"`
	// HostKeys are the host's public keys found in known_hosts when it was
	// granted ("ssh-ed25519 AAAA..."). When there is none, runs with the
	// grant do not start until a host key is known and the host granted
	// again.
	HostKeys []string `json:"host_keys"`
}

// GrantSSH grants host a key of the SSH agent at $SSH_AUTH_SOCK: the one
// whose fingerprint is fingerprint ("SHA256:...", the prefix optional), or
// the agent's first when "". No secret is stored: signing stays with the
// agent. Runs use the grant as "ssh:HOST"; Revoke("ssh:HOST", home)
// removes it. home is the moat home ("" for the default). No agent, an
// agent without keys, or a fingerprint it does not hold is an *Error with
// StatusInvalidArgument; an agent that does not answer is StatusIO.
func GrantSSH(host, fingerprint, home string) (*SSHGrant, error) {
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_grant_ssh(cs.of(host), cs.orNull(fingerprint), cs.orNull(home), out, e)
	})
	if err != nil {
		return nil, err
	}
	grant := &SSHGrant{}
	return grant, decode("moat_grant_ssh", raw, grant)
}

// AWSGrantOptions configures GrantAWS.
type AWSGrantOptions struct {
	// RoleARN is the IAM role runs assume,
	// arn:aws:iam::123456789012:role/AgentRole.
	RoleARN string
	// Region is the STS region (us-east-1 when "").
	Region string
	// SessionDuration is how long each session lasts, rounded up to a
	// second: 15 minutes to 12 hours (15 minutes when 0).
	SessionDuration time.Duration
	// ExternalID is the role's external id, when its trust policy
	// requires one.
	ExternalID string
	// Home is the moat home ($MOAT_HOME, else ~/.moat, when "").
	Home string
}

// AWSRole is the stored AWS grant.
type AWSRole struct {
	// RoleARN is the role runs assume.
	RoleARN string `json:"role_arn"`
	// Region is the STS region.
	Region string `json:"region"`
	// SessionSeconds is each session's length, in seconds.
	SessionSeconds int `json:"session_duration"`
	// ExternalID is the role's external id, or "".
	ExternalID string `json:"external_id"`
	// Created is when it was granted (RFC 3339).
	Created string `json:"created"`
}

// GrantAWS stores an AWS role for runs to assume (the grant "aws"). No
// secret is stored: the host's AWS credentials are used when a run starts.
// An ARN that is not an IAM role's, a bad region or a duration STS does
// not allow is an *Error with StatusInvalidArgument.
func GrantAWS(opts AWSGrantOptions) (*AWSRole, error) {
	d := opts.SessionDuration
	if d < 0 || d > math.MaxUint32*time.Second {
		return nil, invalid(fmt.Sprintf("session duration %v is outside what STS allows (15m to 12h)", d))
	}
	secs := C.uint32_t((d + time.Second - 1) / time.Second)
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_grant_aws(cs.of(opts.RoleARN), cs.orNull(opts.Region), secs,
			cs.orNull(opts.ExternalID), cs.orNull(opts.Home), out, e)
	})
	if err != nil {
		return nil, err
	}
	role := &AWSRole{}
	return role, decode("moat_grant_aws", raw, role)
}

// Grants lists the grants stored in the moat home home ("" for the
// default), never their tokens: tokens, the AWS role and SSH grants.
func Grants(home string) ([]GrantInfo, error) {
	var cs cstrings
	defer cs.free()
	raw, err := callJSON(func(out **C.char, e **C.moat_error) C.moat_status {
		return C.moat_grants_json(cs.orNull(home), out, e)
	})
	if err != nil {
		return nil, err
	}
	var grants []GrantInfo
	return grants, decode("moat_grants_json", raw, &grants)
}

// Revoke removes the stored grant grant ("github", "aws", "ssh:HOST", ...)
// from the moat home home ("" for the default), and reports whether there
// was one.
func Revoke(grant, home string) (bool, error) {
	var cs cstrings
	defer cs.free()
	var removed C.bool
	err := call(func(e **C.moat_error) C.moat_status {
		return C.moat_revoke(cs.of(grant), cs.orNull(home), &removed, e)
	})
	return bool(removed), err
}
