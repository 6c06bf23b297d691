package moat_test

// The Go binding against the installed libmoat (tests/c/installed.sh
// installs it and runs these with PKG_CONFIG_PATH at the install): a
// configuration, a proxy in front of a local HTTPS server, and real runs
// on the local test image (MOAT_TEST_IMAGE, default moat-test:bookworm) on
// MOAT_RUNTIME's engine (default docker), their `moat` found by the
// library in its own install prefix. All traffic stays on this machine.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moat-dev/moat/go/moat"
)

func TestVersionIsTheInstalledOne(t *testing.T) {
	out, err := exec.Command("pkg-config", "--modversion", "moat").Output()
	if err != nil {
		t.Fatalf("pkg-config --modversion moat: %v (is PKG_CONFIG_PATH the install's lib/pkgconfig?)", err)
	}
	if got, want := moat.Version(), strings.TrimSpace(string(out)); got != want {
		t.Fatalf("libmoat says version %q, moat.pc %q", got, want)
	}
}

func write(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestLoadConfig(t *testing.T) {
	ws := t.TempDir()
	write(t, filepath.Join(ws, "agent.yaml"), "name: go-agent\nimage: example.test/go-agent:1\nports:\n  web: 3000\n")
	config, err := moat.LoadConfig(filepath.Join(ws, "agent.yaml"))
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	if config.Name != "go-agent" || config.Image != "example.test/go-agent:1" {
		t.Fatalf("name %q, image %q", config.Name, config.Image)
	}
	var doc struct {
		Image string         `json:"image"`
		Ports map[string]int `json:"ports"`
	}
	if err := json.Unmarshal(config.JSON, &doc); err != nil || doc.Image != config.Image || doc.Ports["web"] != 3000 {
		t.Fatalf("JSON %s: %v", config.JSON, err)
	}

	empty := t.TempDir()
	config, err = moat.LoadConfig(empty)
	if err != nil || config.Name != "" || config.Image != "ubuntu:22.04" {
		t.Fatalf("defaults: %+v, %v", config, err)
	}
}

func TestLoadConfigCarriesEveryProblem(t *testing.T) {
	ws := t.TempDir()
	file := filepath.Join(ws, "agent.yaml")
	write(t, file, "name: ok\nports:\n  web: 70000\ngrnats: [github]\nnetwork:\n  policy: lenient\n")
	config, err := moat.LoadConfig(ws)
	if config != nil || err == nil {
		t.Fatalf("an invalid configuration loaded: %+v", config)
	}
	if !errors.Is(err, moat.StatusConfig) {
		t.Fatalf("not a configuration error: %v", err)
	}
	var merr *moat.Error
	if !errors.As(err, &merr) {
		t.Fatalf("not a *moat.Error: %T", err)
	}
	want := []moat.Problem{
		{Path: file, Line: 3, Column: 8, Message: "ports.web: port 70000 is out of range (1-65535)"},
		{Path: file, Line: 4, Column: 1, Message: `unknown field "grnats" (did you mean "grants"?)`},
		{Path: file, Line: 6, Column: 11, Message: `network.policy: unknown network policy "lenient" (expected "permissive" or "strict")`},
	}
	if len(merr.Problems) != len(want) {
		t.Fatalf("problems: %+v", merr.Problems)
	}
	for i, p := range merr.Problems {
		if p != want[i] {
			t.Errorf("problem %d: %+v, want %+v", i, p, want[i])
		}
		if !strings.Contains(merr.Message, p.String()) {
			t.Errorf("the message lacks %q:\n%s", p.String(), merr.Message)
		}
	}
	if !strings.HasPrefix(err.Error(), file+":3:8: ") {
		t.Errorf("headline: %q", err.Error())
	}

	_, err = moat.LoadConfig("/nonexistent/moat")
	if !errors.Is(err, moat.StatusIO) || errors.Is(err, moat.StatusConfig) {
		t.Fatalf("a missing workspace: %v", err)
	}
	if !strings.Contains(err.Error(), "no such file or directory") {
		t.Fatalf("a missing workspace: %q", err.Error())
	}
}

const upstreamHost = "upstream.moat-go.test"

// upstream serves HTTPS on loopback with a certificate for upstreamHost
// from a CA of its own, answering with the Authorization header it saw; it
// returns its address and the PEM file of its CA.
func upstream(t *testing.T) (string, string) {
	t.Helper()
	return fakeUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "path=%s authorization=%q\n", r.URL.Path, r.Header.Get("Authorization"))
	}), upstreamHost)
}

// through makes a GET through the proxy, trusting the moat CA.
func through(t *testing.T, proxy *moat.Proxy, target string) string {
	t.Helper()
	proxyURL, err := url.Parse(proxy.URL())
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(proxy.CACertPath())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatalf("no certificate in %s", proxy.CACertPath())
	}
	client := &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			Proxy:           http.ProxyURL(proxyURL),
			TLSClientConfig: &tls.Config{RootCAs: pool},
		},
	}
	resp, err := client.Get(target)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

const token = "Bearer go_SECRET_token_0123456789"

func TestProxyInjectsACredential(t *testing.T) {
	addr, caFile := upstream(t)
	proxy, err := moat.StartProxy(moat.ProxyOptions{
		Home:        t.TempDir(),
		UpstreamCA:  caFile,
		Name:        "go-test",
		Resolve:     map[string]string{upstreamHost + ":443": addr},
		Credentials: []moat.Credential{{Host: upstreamHost, Header: "Authorization", Value: token, Grant: "github"}},
	})
	if err != nil {
		t.Fatalf("StartProxy: %v", err)
	}
	defer proxy.Close()
	if !strings.HasPrefix(proxy.URL(), "http://moat:") || !strings.HasPrefix(proxy.Address(), "127.0.0.1:") {
		t.Fatalf("URL %q, address %q", proxy.URL(), proxy.Address())
	}

	body := through(t, proxy, "https://"+upstreamHost+"/from-go")
	if want := fmt.Sprintf("path=/from-go authorization=%q\n", token); body != want {
		t.Fatalf("the upstream saw %q, want %q", body, want)
	}
	env, err := proxy.Env()
	if err != nil || env["HTTPS_PROXY"] != proxy.URL() || env["SSL_CERT_FILE"] == "" {
		t.Fatalf("Env: %v, %v", env, err)
	}
	if err := proxy.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := proxy.Close(); err != nil {
		t.Fatalf("Close twice: %v", err)
	}

	// The trace and audit stay readable after Close; no token in either.
	trace, err := proxy.Trace()
	if err != nil || len(trace) != 1 {
		t.Fatalf("Trace: %v, %v", trace, err)
	}
	if trace[0]["grant"] != "github" || trace[0]["client"] != "go-test" {
		t.Fatalf("trace record: %v", trace[0])
	}
	audit, err := proxy.Audit()
	if err != nil {
		t.Fatalf("Audit: %v", err)
	}
	docs, _ := json.Marshal([]any{trace, audit})
	if strings.Contains(string(docs), "go_SECRET") {
		t.Fatalf("the token is in the trace or audit: %s", docs)
	}
	if !strings.Contains(string(docs), "credential_injected") {
		t.Fatalf("no credential_injected event: %s", docs)
	}
	if printed := fmt.Sprintf("%v %+v %#v", moat.Credential{Value: token}, moat.Credential{Value: token}, moat.Credential{Value: token}); strings.Contains(printed, "go_SECRET") {
		t.Fatalf("a Credential prints its value: %s", printed)
	}
}

func TestProxyRefusesBadOptions(t *testing.T) {
	_, err := moat.StartProxy(moat.ProxyOptions{Home: t.TempDir(), Policy: "paranoid"})
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "unknown network policy") {
		t.Fatalf("policy paranoid: %v", err)
	}
	_, err = moat.StartProxy(moat.ProxyOptions{
		Home:        t.TempDir(),
		Credentials: []moat.Credential{{Host: "api.github.com", Header: "Authorization", Value: "Bearer sec\nret"}},
	})
	if !errors.Is(err, moat.StatusInvalidArgument) || strings.Contains(err.Error(), "sec") {
		t.Fatalf("a value with a newline: %v", err)
	}
}

// runOptions are the options every run of these tests shares; the
// supervisor is left for the library to find in its install prefix, so
// MOAT_SUPERVISOR is cleared and PATH has no `moat`.
func runOptions(t *testing.T) moat.RunOptions {
	t.Helper()
	t.Setenv("MOAT_SUPERVISOR", "")
	var path []string
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if _, err := os.Stat(filepath.Join(dir, "moat")); err != nil {
			path = append(path, dir)
		}
	}
	t.Setenv("PATH", strings.Join(path, string(os.PathListSeparator)))
	image := os.Getenv("MOAT_TEST_IMAGE")
	if image == "" {
		image = "moat-test:bookworm"
	}
	engine := os.Getenv("MOAT_RUNTIME")
	if engine == "" {
		engine = "docker"
	}
	return moat.RunOptions{Workspace: t.TempDir(), Home: t.TempDir(), Image: image, Runtime: engine}
}

func TestRun(t *testing.T) {
	opts := runOptions(t)
	opts.Name = "go-run"
	opts.Command = []string{"sh", "-c", `echo "out $GREETING"; echo err >&2; exit 7`}
	opts.Env = []string{"GREETING=from-go"}
	run, err := moat.StartRun(opts)
	if err != nil {
		t.Fatalf("StartRun (image %s on %s; scripts/build-test-image.sh makes the image): %v", opts.Image, opts.Runtime, err)
	}
	defer run.Destroy()
	if !strings.HasPrefix(run.ID(), "run_") || len(run.ID()) != 16 || run.Name() != "go-run" {
		t.Fatalf("id %q, name %q", run.ID(), run.Name())
	}
	var stdout, stderr bytes.Buffer
	if err := run.Follow(&stdout, &stderr); err != nil {
		t.Fatalf("Follow: %v", err)
	}
	if stdout.String() != "out from-go\n" || stderr.String() != "err\n" {
		t.Fatalf("stdout %q, stderr %q", stdout.String(), stderr.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	code, err := run.Wait(ctx)
	if err != nil || code != 7 {
		t.Fatalf("Wait: %d, %v", code, err)
	}
	info, err := run.Info()
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	if info.State != "stopped" || info.ExitCode == nil || *info.ExitCode != 7 || info.Engine != opts.Runtime {
		t.Fatalf("info: %s", info.Raw)
	}
	if strings.Contains(string(info.Raw), "from-go") {
		t.Fatalf("an environment value is in run.json: %s", info.Raw)
	}
	again, err := moat.OpenRun("go-run", opts.Home)
	if err != nil || again.ID() != run.ID() || again.Dir() != run.Dir() {
		t.Fatalf("OpenRun: %+v, %v", again, err)
	}
	if err := again.Destroy(); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if _, err := os.Stat(run.Dir()); !os.IsNotExist(err) {
		t.Fatalf("the run's directory is still there: %v", err)
	}
	_, err = moat.OpenRun(run.ID(), opts.Home)
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "no run matches") {
		t.Fatalf("OpenRun after Destroy: %v", err)
	}
}

func TestRunStop(t *testing.T) {
	opts := runOptions(t)
	opts.Command = []string{"sleep", "300"}
	run, err := moat.StartRun(opts)
	if err != nil {
		t.Fatalf("StartRun: %v", err)
	}
	defer run.Destroy()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := run.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait on a sleeping run: %v", err)
	}
	// Wait in one goroutine, Stop in another.
	waited := make(chan error, 1)
	go func() {
		_, err := run.Wait(context.Background())
		waited <- err
	}()
	started := time.Now()
	if err := run.Stop(time.Second); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Fatalf("Wait: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Wait did not return after Stop")
	}
	if elapsed := time.Since(started); elapsed > 60*time.Second {
		t.Fatalf("Stop took %v", elapsed)
	}
	info, err := run.Info()
	if err != nil || info.State != "stopped" {
		t.Fatalf("after Stop: %+v, %v", info, err)
	}
}

func TestRunRefusesBadOptions(t *testing.T) {
	opts := runOptions(t)
	opts.Command = []string{"true"}
	bad := opts
	bad.Env = []string{"NOEQUALS"}
	if _, err := moat.StartRun(bad); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "KEY=VALUE") {
		t.Fatalf("env NOEQUALS: %v", err)
	}
	bad = opts
	bad.Runtime = "kubernetes"
	if _, err := moat.StartRun(bad); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), `"kubernetes" is not a container engine`) {
		t.Fatalf("runtime kubernetes: %v", err)
	}
	// The moat home itself is never a workspace.
	bad = opts
	bad.Workspace = opts.Home
	if _, err := moat.StartRun(bad); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "moat's own files") {
		t.Fatalf("the home as workspace: %v", err)
	}
}
