package moat

/*
#include <moat.h>
*/
import "C"

import (
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"sync"
)

// ProxyOptions configures StartProxy. The zero value is a permissive proxy
// on 127.0.0.1 (a free port) with no credentials, its CA under the moat
// home.
type ProxyOptions struct {
	// Listen is the address to listen on, host:port.
	Listen string
	// Home is the moat home ($MOAT_HOME, else ~/.moat, when "").
	Home string
	// UpstreamCA is a PEM file of further CAs trusted for upstreams.
	UpstreamCA string
	// Policy is "permissive" (the default) or "strict".
	Policy string
	// Name is the client's name in traces and audit events.
	Name string
	// Allow holds strict mode's host patterns ("api.github.com",
	// "*.github.com").
	Allow []string
	// Rules are request rules (network.rules, docs/policy.md).
	Rules []Rule
	// Resolve connects to an address whenever a host:port is requested,
	// like curl's --resolve: "api.example.test:443" -> "127.0.0.1:8443".
	Resolve map[string]string
	// Grants are stored grants ("github", "anthropic", a custom provider)
	// whose credentials are injected; read from the store at start.
	Grants []string
	// Credentials are injected as given.
	Credentials []Credential
	// AuditDir, when set, is where the client's tamper-evident audit log
	// is written.
	AuditDir string
	// CaptureBodies is how many bytes of text bodies traces keep (0: none).
	CaptureBodies int
	// TraceLimit and TraceBytes bound the trace records and audit events
	// kept in memory (0: the defaults, 100000 and 32 MiB); the oldest go
	// first.
	TraceLimit, TraceBytes int
}

// Rule is a request rule for the host pattern Host, such as
// "allow GET /repos/**" or "deny git-push refs/heads/main"; an empty Rule
// adds Host as a plain entry (reachable in strict mode).
type Rule struct {
	Host, Rule string
}

// Credential is a header added to requests to Host (a host or "*." pattern,
// optionally :port; 443 by default). Value is a secret: String and GoString
// print it as ****.
type Credential struct {
	Host, Header, Value string
	// Grant names the credential in traces (may be "").
	Grant string
}

// String prints the credential without its value.
func (c Credential) String() string {
	return fmt.Sprintf("%s: %s: **** (grant %q)", c.Host, c.Header, c.Grant)
}

// GoString prints the credential without its value.
func (c Credential) GoString() string {
	return fmt.Sprintf("moat.Credential{Host:%q, Header:%q, Value:\"****\", Grant:%q}", c.Host, c.Header, c.Grant)
}

// Proxy is a running proxy with one client. Close stops it; its trace and
// audit events stay readable after.
type Proxy struct {
	mu      sync.RWMutex
	handle  *C.moat_proxy
	closed  bool
	url     string
	address string
	caCert  string
}

// StartProxy starts a proxy with one client.
func StartProxy(opts ProxyOptions) (*Proxy, error) {
	options := C.moat_proxy_options_new()
	if options == nil {
		return nil, errors.New("moat: moat_proxy_options_new failed")
	}
	defer C.moat_proxy_options_free(options)
	var cs cstrings
	defer cs.free()
	set := func(key, value string) error {
		if value == "" {
			return nil
		}
		return call(func(e **C.moat_error) C.moat_status {
			return C.moat_proxy_options_set(options, cs.of(key), cs.of(value), e)
		})
	}
	number := func(n int) string {
		if n == 0 {
			return ""
		}
		return strconv.Itoa(n)
	}
	steps := []func() error{
		func() error { return set("listen", opts.Listen) },
		func() error { return set("home", opts.Home) },
		func() error { return set("upstream_ca", opts.UpstreamCA) },
		func() error { return set("policy", opts.Policy) },
		func() error { return set("name", opts.Name) },
		func() error { return set("audit_dir", opts.AuditDir) },
		func() error { return set("capture_bodies", number(opts.CaptureBodies)) },
		func() error { return set("trace_limit", number(opts.TraceLimit)) },
		func() error { return set("trace_bytes", number(opts.TraceBytes)) },
	}
	for _, pattern := range opts.Allow {
		pattern := pattern
		steps = append(steps, func() error {
			return call(func(e **C.moat_error) C.moat_status {
				return C.moat_proxy_options_add_allow(options, cs.of(pattern), e)
			})
		})
	}
	for _, rule := range opts.Rules {
		rule := rule
		steps = append(steps, func() error {
			return call(func(e **C.moat_error) C.moat_status {
				return C.moat_proxy_options_add_rule(options, cs.of(rule.Host), cs.orNull(rule.Rule), e)
			})
		})
	}
	for hostPort, address := range opts.Resolve {
		hostPort, address := hostPort, address
		steps = append(steps, func() error {
			return call(func(e **C.moat_error) C.moat_status {
				return C.moat_proxy_options_add_resolve(options, cs.of(hostPort), cs.of(address), e)
			})
		})
	}
	for _, grant := range opts.Grants {
		grant := grant
		steps = append(steps, func() error {
			return call(func(e **C.moat_error) C.moat_status {
				return C.moat_proxy_options_add_grant(options, cs.of(grant), e)
			})
		})
	}
	for _, cred := range opts.Credentials {
		cred := cred
		steps = append(steps, func() error {
			var value cstrings
			defer value.free()
			return call(func(e **C.moat_error) C.moat_status {
				return C.moat_proxy_options_add_credential(options, cs.of(cred.Host), cs.of(cred.Header),
					value.of(cred.Value), cs.orNull(cred.Grant), e)
			})
		})
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return nil, err
		}
	}
	p := &Proxy{}
	err := call(func(e **C.moat_error) C.moat_status {
		return C.moat_proxy_start(options, &p.handle, e)
	})
	if err != nil {
		return nil, err
	}
	p.url = C.GoString(C.moat_proxy_url(p.handle))
	p.address = C.GoString(C.moat_proxy_address(p.handle))
	p.caCert = C.GoString(C.moat_proxy_ca_cert_path(p.handle))
	runtime.SetFinalizer(p, (*Proxy).free)
	return p, nil
}

// URL is the proxy URL with the client's token, http://moat:TOKEN@host:port
// (the token is the client's only credential: treat it as a secret).
func (p *Proxy) URL() string { return p.url }

// Address is the listen address, host:port.
func (p *Proxy) Address() string { return p.address }

// CACertPath is the moat CA certificate (PEM) that clients must trust.
func (p *Proxy) CACertPath() string { return p.caCert }

// Env is the environment a child process needs to use the proxy
// (HTTPS_PROXY, SSL_CERT_FILE, ...).
func (p *Proxy) Env() (map[string]string, error) {
	env := map[string]string{}
	return env, p.document(C.MOAT_PROXY_ENV, &env)
}

// Trace is the trace so far: one object per request (docs/proxy.md), with
// credential values redacted.
func (p *Proxy) Trace() ([]map[string]any, error) {
	var records []map[string]any
	return records, p.document(C.MOAT_PROXY_TRACE, &records)
}

// Audit is the audit events so far, one object each.
func (p *Proxy) Audit() ([]map[string]any, error) {
	var events []map[string]any
	return events, p.document(C.MOAT_PROXY_AUDIT, &events)
}

func (p *Proxy) document(doc C.int, into any) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.handle == nil {
		return errors.New("moat: the proxy's handle is freed")
	}
	var text *C.char
	err := call(func(e **C.moat_error) C.moat_status {
		return C.moat_proxy_json(p.handle, doc, &text, e)
	})
	if err != nil {
		return err
	}
	return json.Unmarshal([]byte(takeString(text)), into)
}

// Close stops the proxy and waits for its connections to end. Closing
// twice is fine.
func (p *Proxy) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.handle == nil {
		return nil
	}
	p.closed = true
	return call(func(e **C.moat_error) C.moat_status {
		return C.moat_proxy_close(p.handle, e)
	})
}

// free stops (if needed) and frees the handle; the finalizer.
func (p *Proxy) free() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.handle != nil {
		C.moat_proxy_free(p.handle)
		p.handle = nil
	}
}
