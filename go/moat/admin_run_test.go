package moat_test

// A run's artifacts through the Go binding: a real run on the local test
// image (as in moat_test.go) with a GitHub grant taken from the
// environment, whose requests go through its proxy to stand-ins on
// loopback (MOAT_RESOLVE, MOAT_UPSTREAM_CA_FILE, inherited by the run's
// supervisor). Then its trace as HAR, its policy checked and suggested, its
// audit log verified, the run promoted, the engine's containers listed,
// and the home cleaned.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moat-dev/moat/go/moat"
)

const otherHost = "other.moat-go.test"

func TestRunArtifacts(t *testing.T) {
	opts := runOptions(t)
	t.Setenv("MOAT_KEYRING_BACKEND", "file")
	addr, caFile := fakeUpstream(t, githubAPI, "api.github.com", otherHost)
	t.Setenv("MOAT_UPSTREAM_CA_FILE", caFile)
	t.Setenv("MOAT_RESOLVE", fmt.Sprintf("api.github.com:443=%s,%s:443=%s", addr, otherHost, addr))
	t.Setenv("GH_TOKEN", "")
	t.Setenv("GITHUB_TOKEN", githubToken)
	if _, err := moat.Grant("github", moat.GrantOptions{Home: opts.Home}); err != nil {
		t.Fatalf("Grant: %v", err)
	}
	t.Setenv("GITHUB_TOKEN", "")

	opts.Name = "go-artifacts"
	opts.Grants = []string{"github"}
	opts.Command = []string{"sh", "-c", "curl -sS --max-time 20 https://api.github.com/user; echo; " +
		"curl -sS --max-time 20 -X POST -d x https://" + otherHost + "/docs/page"}
	run, err := moat.StartRun(opts)
	if err != nil {
		t.Fatalf("StartRun (image %s on %s; scripts/build-test-image.sh makes the image): %v", opts.Image, opts.Runtime, err)
	}
	defer run.Destroy()
	var stdout, stderr bytes.Buffer
	if err := run.Follow(&stdout, &stderr); err != nil {
		t.Fatalf("Follow: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if code, err := run.Wait(ctx); err != nil || code != 0 {
		t.Fatalf("Wait: %d, %v (stderr %q)", code, err, stderr.String())
	}
	if want := fmt.Sprintf("{\"login\":%q}\nPOST /docs/page\n", githubLogin); stdout.String() != want {
		t.Fatalf("stdout %q, want %q (stderr %q)", stdout.String(), want, stderr.String())
	}

	// The trace as HAR 1.2, owner-only, the token redacted.
	har := filepath.Join(t.TempDir(), "trace.har")
	entries, err := moat.TraceHAR(run.ID(), har, opts.Home)
	if err != nil || entries != 2 {
		t.Fatalf("TraceHAR: %d, %v", entries, err)
	}
	info, err := os.Stat(har)
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("the HAR file: %v, %v", info, err)
	}
	data, err := os.ReadFile(har)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Log struct {
			Version string `json:"version"`
			Entries []struct {
				Request struct {
					Method string `json:"method"`
					URL    string `json:"url"`
				} `json:"request"`
				Response struct {
					Status int `json:"status"`
				} `json:"response"`
			} `json:"entries"`
		} `json:"log"`
	}
	if err := json.Unmarshal(data, &doc); err != nil || doc.Log.Version != "1.2" || len(doc.Log.Entries) != 2 {
		t.Fatalf("HAR: %v\n%s", err, data)
	}
	if e := doc.Log.Entries[0]; e.Request.Method != "GET" || e.Request.URL != "https://api.github.com/user" || e.Response.Status != 200 {
		t.Fatalf("HAR entry 0: %+v", e)
	}
	if e := doc.Log.Entries[1]; e.Request.Method != "POST" || e.Request.URL != "https://"+otherHost+"/docs/page" {
		t.Fatalf("HAR entry 1: %+v", e)
	}
	if strings.Contains(string(data), githubToken) || !strings.Contains(string(data), "[redacted]") {
		t.Fatalf("the HAR file does not redact the token:\n%s", data)
	}
	// "" is the most recent run; a run that is not there is refused.
	if n, err := moat.TraceHAR("", filepath.Join(t.TempDir(), "latest.har"), opts.Home); err != nil || n != 2 {
		t.Fatalf("TraceHAR of the latest run: %d, %v", n, err)
	}
	missing := filepath.Join(t.TempDir(), "missing.har")
	_, err = moat.TraceHAR("no-such-run", missing, opts.Home)
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "no run matches") {
		t.Fatalf("TraceHAR of no run: %v", err)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Fatalf("TraceHAR of no run wrote a file: %v", err)
	}

	// Policy: the workspace has no agent.yaml (permissive): nothing
	// changes. Strict, the grant's host stays allowed and the other host
	// is denied. The suggestion, made agent.yaml, allows everything again.
	check, err := moat.CheckPolicy(run.Name(), opts.Home)
	if err != nil || check.Run != run.ID() || check.Requests != 2 || len(check.Changes) != 0 {
		t.Fatalf("CheckPolicy: %+v, %v", check, err)
	}
	agentYAML := filepath.Join(opts.Workspace, "agent.yaml")
	write(t, agentYAML, "network:\n  policy: strict\n")
	check, err = moat.CheckPolicy(run.ID(), opts.Home)
	if err != nil || check.Requests != 2 || len(check.Changes) != 1 {
		t.Fatalf("CheckPolicy, strict: %+v, %v", check, err)
	}
	if c := check.Changes[0]; c.Method != "POST" || c.URL != "https://"+otherHost+"/docs/page" || c.Then != "allowed" || c.Now != "denied" || c.Rule == "" {
		t.Fatalf("change: %+v", c)
	}
	suggestion, err := moat.SuggestPolicy(run.ID(), opts.Home)
	if err != nil {
		t.Fatalf("SuggestPolicy: %v", err)
	}
	for _, want := range []string{"policy: strict", "- api.github.com:", "- allow GET /user", "- " + otherHost + ":", "- allow POST /docs/page"} {
		if !strings.Contains(suggestion, want) {
			t.Fatalf("the suggestion lacks %q:\n%s", want, suggestion)
		}
	}
	write(t, agentYAML, suggestion)
	if _, err := moat.LoadConfig(opts.Workspace); err != nil {
		t.Fatalf("the suggestion does not load: %v\n%s", err, suggestion)
	}
	check, err = moat.CheckPolicy("", opts.Home)
	if err != nil || check.Run != run.ID() || len(check.Changes) != 0 {
		t.Fatalf("CheckPolicy under the suggestion: %+v, %v", check, err)
	}
	if _, err := moat.SuggestPolicy("no-such-run", opts.Home); !errors.Is(err, moat.StatusInvalidArgument) {
		t.Fatalf("SuggestPolicy of no run: %v", err)
	}
	if _, err := moat.CheckPolicy("no-such-run", opts.Home); !errors.Is(err, moat.StatusInvalidArgument) {
		t.Fatalf("CheckPolicy of no run: %v", err)
	}

	// The run's audit log: the credential injected, the run's end.
	report, err := moat.VerifyAudit(run.Dir(), opts.Home, "")
	if err != nil {
		t.Fatalf("VerifyAudit: %v", err)
	}
	if typeCount(report, "credential_injected") != 1 || typeCount(report, "run_stopped") != 1 || !report.Closed {
		t.Fatalf("audit report: %s", report.Raw)
	}

	// Promoted: out of the run's directory, with a bundle that verifies
	// with the log's key; not twice to the same place.
	to := filepath.Join(t.TempDir(), "promoted")
	promoted, err := moat.Promote(run.Name(), to, opts.Home)
	if err != nil {
		t.Fatalf("Promote: %v", err)
	}
	if promoted.Format != "moat-promoted/1" || promoted.Run != run.ID() || promoted.Name != run.Name() ||
		promoted.Dir != to || promoted.Workspace != opts.Workspace || promoted.Bundle != "audit-bundle.json" || promoted.BundleProblem != "" {
		t.Fatalf("promoted: %s", promoted.Raw)
	}
	copied := map[string]moat.PromotedFile{}
	for _, f := range promoted.Files {
		copied[f.Name] = f
	}
	for _, name := range []string{"run.json", "audit.jsonl", "network.jsonl", "audit-bundle.json"} {
		if f, ok := copied[name]; !ok || f.Bytes == 0 || len(f.SHA256) != 64 {
			t.Fatalf("%s is not among the files copied: %+v", name, promoted.Files)
		}
	}
	var manifest moat.Promoted
	if data, err := os.ReadFile(filepath.Join(to, "promoted.json")); err != nil || json.Unmarshal(data, &manifest) != nil || manifest.Run != run.ID() {
		t.Fatalf("promoted.json: %v", err)
	}
	bundle := filepath.Join(to, promoted.Bundle)
	if verified, err := moat.VerifyBundle(bundle, report.VKey); err != nil || verified.Entries != report.Entries {
		t.Fatalf("VerifyBundle of the promoted bundle: %+v, %v", verified, err)
	}
	if _, err := moat.Promote(run.ID(), to, opts.Home); !errors.Is(err, moat.StatusInvalidArgument) {
		t.Fatalf("Promote to a directory that is not empty: %v", err)
	}

	// A run that is still going: listed among the home's containers,
	// refused by Promote, left by Clean.
	sleeper := opts
	sleeper.Name = "go-sleeper"
	sleeper.Workspace = t.TempDir()
	sleeper.Grants = nil
	sleeper.Command = []string{"sleep", "300"}
	asleep, err := moat.StartRun(sleeper)
	if err != nil {
		t.Fatalf("StartRun: %v", err)
	}
	defer asleep.Destroy()
	var containers []struct {
		Run, Home, State, Image, Engine string
	}
	raw, err := moat.System("containers", false, opts.Home)
	if err != nil || json.Unmarshal(raw, &containers) != nil {
		t.Fatalf("System containers: %s, %v", raw, err)
	}
	found := false
	for _, c := range containers {
		if c.Home != opts.Home {
			t.Fatalf("another home's container: %s", raw)
		}
		if c.Run == asleep.ID() {
			// Podman names a local image with its registry, localhost/.
			image := strings.TrimPrefix(c.Image, "localhost/")
			found = c.State == "running" && image == opts.Image && c.Engine == opts.Runtime
		}
	}
	if !found {
		t.Fatalf("the sleeping run is not among the containers: %s", raw)
	}
	if raw, err := moat.System("containers", true, opts.Home); err != nil || !strings.Contains(string(raw), asleep.ID()) {
		t.Fatalf("System containers of every home: %s, %v", raw, err)
	}
	var images []json.RawMessage
	if raw, err := moat.System("images", false, opts.Home); err != nil || json.Unmarshal(raw, &images) != nil || len(images) != 0 {
		t.Fatalf("System images (the runs built none): %s, %v", raw, err)
	}
	if _, err := moat.System("volumes", false, opts.Home); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "volumes") {
		t.Fatalf("System volumes: %v", err)
	}
	if _, err := moat.Promote(asleep.ID(), "", opts.Home); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "once it is over") {
		t.Fatalf("Promote of a running run: %v", err)
	}
	dry, err := moat.Clean(moat.CleanOptions{Home: opts.Home, DryRun: true, KeepImages: true})
	if err != nil || strings.Join(dry.Runs, ",") != run.ID() || len(dry.Images) != 0 {
		t.Fatalf("Clean, dry run: %+v, %v", dry, err)
	}
	if _, err := os.Stat(run.Dir()); err != nil {
		t.Fatalf("a dry run removed the run: %v", err)
	}
	cleaned, err := moat.Clean(moat.CleanOptions{Home: opts.Home, KeepImages: true})
	if err != nil || strings.Join(cleaned.Runs, ",") != run.ID() {
		t.Fatalf("Clean: %+v, %v", cleaned, err)
	}
	if _, err := os.Stat(run.Dir()); !os.IsNotExist(err) {
		t.Fatalf("Clean left the run's directory: %v", err)
	}
	if _, err := moat.OpenRun(run.ID(), opts.Home); !errors.Is(err, moat.StatusInvalidArgument) {
		t.Fatalf("OpenRun of a cleaned run: %v", err)
	}
	if _, err := moat.OpenRun(asleep.ID(), opts.Home); err != nil {
		t.Fatalf("Clean removed the running run: %v", err)
	}
	// What was promoted stays, and still verifies.
	if _, err := moat.VerifyBundle(bundle, report.VKey); err != nil {
		t.Fatalf("VerifyBundle after Clean: %v", err)
	}
	if err := asleep.Stop(time.Second); err != nil {
		t.Fatalf("Stop: %v", err)
	}
}
