package moat_test

// Grants, audit logs, dependencies and secrets through the Go binding,
// against the installed libmoat: each test has a moat home of its own
// (MOAT_KEYRING_BACKEND=file: the store's key is a file there, never the
// system keyring). The GitHub API a token is validated against, the SSH
// agent and the 1Password CLI are stand-ins on this machine; all traffic
// stays on loopback.

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moat-dev/moat/go/moat"
)

// fakeUpstream serves HTTPS on loopback with handler, with one certificate
// for names from a CA of its own; it returns its address and the PEM file
// of its CA.
func fakeUpstream(t *testing.T, handler http.Handler, names ...string) (string, string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "moat go admin test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "upstream-ca.pem")
	write(t, caFile, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})))
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := &http.Server{
		Handler:   handler,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}},
	}
	go func() { _ = server.ServeTLS(listener, "", "") }()
	t.Cleanup(func() { _ = server.Close() })
	return listener.Addr().String(), caFile
}

const (
	githubToken = "ghp_GO_GRANT_secret_0123456789"
	githubLogin = "octo-go"
)

// githubAPI stands in for api.github.com: GET /user answers the login for
// githubToken and 401 for any other token; other paths echo the request.
var githubAPI = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/user" {
		fmt.Fprintf(w, "%s %s\n", r.Method, r.URL.Path)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if r.Header.Get("Authorization") != "Bearer "+githubToken {
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"message":"Bad credentials"}`)
		return
	}
	fmt.Fprintf(w, `{"login":%q}`, githubLogin)
})

// grantHome is a moat home whose credential store keeps its key in a file,
// with no GitHub token in the environment.
func grantHome(t *testing.T) string {
	t.Helper()
	t.Setenv("MOAT_KEYRING_BACKEND", "file")
	t.Setenv("GITHUB_TOKEN", "")
	t.Setenv("GH_TOKEN", "")
	return t.TempDir()
}

// providers are the grants' names.
func providers(grants []moat.GrantInfo) []string {
	names := []string{}
	for _, g := range grants {
		names = append(names, g.Provider)
	}
	return names
}

// filesHolding lists the files under dir that contain needle.
func filesHolding(t *testing.T, dir, needle string) []string {
	t.Helper()
	var found []string
	err := filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if strings.Contains(string(data), needle) {
			found = append(found, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

func TestGrantFromTheEnvironmentListInjectRevoke(t *testing.T) {
	home := grantHome(t)
	grants, err := moat.Grants(home)
	if err != nil || len(grants) != 0 {
		t.Fatalf("Grants of a new home: %v, %v", grants, err)
	}

	t.Setenv("GITHUB_TOKEN", githubToken)
	granted, err := moat.Grant("github", moat.GrantOptions{Home: home})
	if err != nil {
		t.Fatalf("Grant: %v", err)
	}
	g := granted.Grant
	if g.Provider != "github" || g.Source != "env:GITHUB_TOKEN" || g.Problem != "" || g.Created == "" {
		t.Fatalf("granted: %s", granted.Raw)
	}
	if !contains(g.Hosts, "api.github.com") || !contains(g.Hosts, "github.com") {
		t.Fatalf("hosts: %v", g.Hosts)
	}
	// MOAT_KEYRING_BACKEND=file: the key is a file in the home, and
	// neither it nor the grant's file holds the token in clear.
	if granted.KeyFile == "" || !strings.HasPrefix(granted.KeyFile, home) || !strings.HasPrefix(granted.Path, home) {
		t.Fatalf("path %q, key file %q (%s)", granted.Path, granted.KeyFile, granted.Raw)
	}
	for _, f := range []string{granted.Path, granted.KeyFile} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
	if found := filesHolding(t, home, githubToken); len(found) != 0 {
		t.Fatalf("the token is in clear in %v", found)
	}
	if strings.Contains(string(granted.Raw), githubToken) {
		t.Fatalf("the token is in Grant's document: %s", granted.Raw)
	}

	grants, err = moat.Grants(home)
	if err != nil || len(grants) != 1 {
		t.Fatalf("Grants: %+v, %v", grants, err)
	}
	if grants[0].Provider != "github" || grants[0].Source != "env:GITHUB_TOKEN" || grants[0].Created != g.Created {
		t.Fatalf("listed: %+v", grants[0])
	}
	if listed, _ := json.Marshal(grants); strings.Contains(string(listed), githubToken) {
		t.Fatalf("the token is listed: %s", listed)
	}

	// A proxy reads the stored token and injects it, the environment's
	// no longer set.
	t.Setenv("GITHUB_TOKEN", "")
	addr, caFile := fakeUpstream(t, githubAPI, "api.github.com")
	proxyOptions := moat.ProxyOptions{
		Home:       home,
		UpstreamCA: caFile,
		Resolve:    map[string]string{"api.github.com:443": addr},
		Grants:     []string{"github"},
	}
	proxy, err := moat.StartProxy(proxyOptions)
	if err != nil {
		t.Fatalf("StartProxy with the grant: %v", err)
	}
	body := through(t, proxy, "https://api.github.com/user")
	proxy.Close()
	if want := fmt.Sprintf(`{"login":%q}`, githubLogin); body != want {
		t.Fatalf("GET /user through the proxy: %q, want %q", body, want)
	}

	removed, err := moat.Revoke("github", home)
	if err != nil || !removed {
		t.Fatalf("Revoke: %v, %v", removed, err)
	}
	grants, err = moat.Grants(home)
	if err != nil || len(grants) != 0 {
		t.Fatalf("Grants after Revoke: %+v, %v", grants, err)
	}
	removed, err = moat.Revoke("github", home)
	if err != nil || removed {
		t.Fatalf("Revoke twice: %v, %v", removed, err)
	}
	_, err = moat.StartProxy(proxyOptions)
	if !errors.Is(err, moat.StatusConfig) || !strings.Contains(err.Error(), "github") {
		t.Fatalf("StartProxy with a revoked grant: %v", err)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestGrantAGivenTokenAndRefusals(t *testing.T) {
	home := grantHome(t)
	opts := moat.GrantOptions{Token: "sk-ant-GO_secret_0123456789", Home: home}
	granted, err := moat.Grant("anthropic", opts)
	if err != nil {
		t.Fatalf("Grant anthropic: %v", err)
	}
	if g := granted.Grant; g.Provider != "anthropic" || g.Source != "api" || g.Kind != "api_key" || !contains(g.Hosts, "api.anthropic.com") {
		t.Fatalf("granted: %s", granted.Raw)
	}
	if printed := fmt.Sprintf("%v %+v %#v %s", opts, opts, opts, opts); strings.Contains(printed, "GO_secret") {
		t.Fatalf("GrantOptions prints its token: %s", printed)
	}

	_, err = moat.Grant("githb", moat.GrantOptions{Token: "x", Home: home})
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), `did you mean "github"`) {
		t.Fatalf("Grant githb: %v", err)
	}
	t.Setenv("OPENAI_API_KEY", "")
	_, err = moat.Grant("openai", moat.GrantOptions{Home: home})
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "OPENAI_API_KEY") {
		t.Fatalf("Grant openai without a token: %v", err)
	}
	_, err = moat.Grant("github", moat.GrantOptions{Token: "ghp_two\nlines", Home: home})
	if !errors.Is(err, moat.StatusInvalidArgument) || strings.Contains(err.Error(), "ghp_two") {
		t.Fatalf("a token with a newline: %v", err)
	}
	for _, provider := range []string{"aws", "ssh"} {
		_, err = moat.Grant(provider, moat.GrantOptions{Token: "x", Home: home})
		if !errors.Is(err, moat.StatusInvalidArgument) {
			t.Fatalf("Grant %s with a token: %v", provider, err)
		}
	}
	grants, err := moat.Grants(home)
	if err != nil || strings.Join(providers(grants), ",") != "anthropic" {
		t.Fatalf("only anthropic is stored: %+v, %v", grants, err)
	}
	if _, err := moat.Revoke("ssh", home); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "ssh:<host>") {
		t.Fatalf("Revoke ssh: %v", err)
	}
}

func TestGrantValidatesAGitHubToken(t *testing.T) {
	home := grantHome(t)
	addr, caFile := fakeUpstream(t, githubAPI, "api.github.com")
	t.Setenv("MOAT_UPSTREAM_CA_FILE", caFile)
	t.Setenv("MOAT_RESOLVE", "api.github.com:443="+addr)

	granted, err := moat.Grant("github", moat.GrantOptions{Token: githubToken, Validate: true, Home: home})
	if err != nil {
		t.Fatalf("Grant with validation: %v", err)
	}
	if login := granted.Grant.Metadata["login"]; login != githubLogin {
		t.Fatalf("login %q: %s", login, granted.Raw)
	}
	_, err = moat.Grant("github", moat.GrantOptions{Token: "ghp_REVOKED_0123456789", Validate: true, Home: home})
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "GitHub rejected the token") {
		t.Fatalf("a token GitHub rejects: %v", err)
	}
	// The rejected token replaced nothing.
	grants, err := moat.Grants(home)
	if err != nil || len(grants) != 1 || grants[0].Metadata["login"] != githubLogin {
		t.Fatalf("Grants: %+v, %v", grants, err)
	}
}

// sshString is the SSH wire encoding of a string.
func sshString(b []byte) []byte {
	out := make([]byte, 4, 4+len(b))
	binary.BigEndian.PutUint32(out, uint32(len(b)))
	return append(out, b...)
}

// ed25519Blob is a new Ed25519 public key in SSH wire format.
func ed25519Blob(t *testing.T) []byte {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return append(sshString([]byte("ssh-ed25519")), sshString(pub)...)
}

// sshAgent serves the SSH agent protocol's identity listing on a Unix
// socket, holding one key with comment; it returns the socket and the
// key's blob.
func sshAgent(t *testing.T, comment string) (string, []byte) {
	t.Helper()
	blob := ed25519Blob(t)
	socket := filepath.Join(t.TempDir(), "agent.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close() })
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go func(conn net.Conn) {
				defer conn.Close()
				for {
					var n uint32
					if err := binary.Read(conn, binary.BigEndian, &n); err != nil || n == 0 || n > 1<<16 {
						return
					}
					msg := make([]byte, n)
					if _, err := io.ReadFull(conn, msg); err != nil {
						return
					}
					answer := []byte{5} // SSH_AGENT_FAILURE
					if msg[0] == 11 {   // SSH2_AGENTC_REQUEST_IDENTITIES
						answer = []byte{12, 0, 0, 0, 1} // SSH2_AGENT_IDENTITIES_ANSWER, 1 key
						answer = append(answer, sshString(blob)...)
						answer = append(answer, sshString([]byte(comment))...)
					}
					if _, err := conn.Write(sshString(answer)); err != nil {
						return
					}
				}
			}(conn)
		}
	}()
	return socket, blob
}

func TestGrantSSH(t *testing.T) {
	home := grantHome(t)
	socket, blob := sshAgent(t, "go-test@moat")
	t.Setenv("SSH_AUTH_SOCK", socket)
	sum := sha256.Sum256(blob)
	fingerprint := "SHA256:" + base64.RawStdEncoding.EncodeToString(sum[:])
	// The host's key, in a known_hosts of our own.
	userHome := t.TempDir()
	t.Setenv("HOME", userHome)
	hostKey := "ssh-ed25519 " + base64.StdEncoding.EncodeToString(ed25519Blob(t))
	if err := os.Mkdir(filepath.Join(userHome, ".ssh"), 0o700); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(userHome, ".ssh", "known_hosts"), "git.moat-go.test "+hostKey+" the host\n")

	grant, err := moat.GrantSSH("Git.Moat-Go.Test.", "", home)
	if err != nil {
		t.Fatalf("GrantSSH: %v", err)
	}
	if grant.Host != "git.moat-go.test" || grant.Created == "" {
		t.Fatalf("grant: %+v", grant)
	}
	if want := (moat.SSHKey{Fingerprint: fingerprint, Comment: "go-test@moat", KeyType: "ssh-ed25519"}); grant.Key != want {
		t.Fatalf("key %+v, want %+v", grant.Key, want)
	}
	if len(grant.HostKeys) != 1 || grant.HostKeys[0] != hostKey {
		t.Fatalf("host keys %q, want [%q]", grant.HostKeys, hostKey)
	}
	// The fingerprint, without its prefix, picks the same key; a host
	// without a known key is granted with none.
	other, err := moat.GrantSSH("other.moat-go.test", strings.TrimPrefix(fingerprint, "SHA256:"), home)
	if err != nil || other.Key.Fingerprint != fingerprint || len(other.HostKeys) != 0 {
		t.Fatalf("GrantSSH by fingerprint: %+v, %v", other, err)
	}
	grants, err := moat.Grants(home)
	if err != nil || strings.Join(providers(grants), ",") != "ssh:git.moat-go.test,ssh:other.moat-go.test" {
		t.Fatalf("Grants: %+v, %v", grants, err)
	}
	if grants[0].Metadata["fingerprint"] != fingerprint || grants[0].Metadata["host_keys_recorded"] != "1" || grants[0].Kind != "ssh-ed25519" {
		t.Fatalf("listed: %+v", grants[0])
	}

	_, err = moat.GrantSSH("git.moat-go.test", "SHA256:nope", home)
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "holds no such key") || !strings.Contains(err.Error(), fingerprint) {
		t.Fatalf("an unknown fingerprint: %v", err)
	}
	_, err = moat.GrantSSH("*.moat-go.test", "", home)
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "without wildcards") {
		t.Fatalf("a wildcard host: %v", err)
	}
	t.Setenv("SSH_AUTH_SOCK", "")
	os.Unsetenv("SSH_AUTH_SOCK")
	_, err = moat.GrantSSH("git.moat-go.test", "", home)
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "SSH_AUTH_SOCK") {
		t.Fatalf("no agent: %v", err)
	}

	removed, err := moat.Revoke("ssh:git.moat-go.test", home)
	if err != nil || !removed {
		t.Fatalf("Revoke: %v, %v", removed, err)
	}
	grants, err = moat.Grants(home)
	if err != nil || strings.Join(providers(grants), ",") != "ssh:other.moat-go.test" {
		t.Fatalf("Grants after Revoke: %+v, %v", grants, err)
	}
}

func TestGrantAWS(t *testing.T) {
	home := grantHome(t)
	const arn = "arn:aws:iam::123456789012:role/GoAgentRole"
	role, err := moat.GrantAWS(moat.AWSGrantOptions{
		RoleARN: arn, Region: "eu-west-1", SessionDuration: time.Hour - time.Millisecond,
		ExternalID: "go-external", Home: home,
	})
	if err != nil {
		t.Fatalf("GrantAWS: %v", err)
	}
	if role.RoleARN != arn || role.Region != "eu-west-1" || role.SessionSeconds != 3600 || role.ExternalID != "go-external" || role.Created == "" {
		t.Fatalf("role: %+v", role)
	}
	grants, err := moat.Grants(home)
	if err != nil || len(grants) != 1 {
		t.Fatalf("Grants: %+v, %v", grants, err)
	}
	if g := grants[0]; g.Provider != "aws" || g.Kind != "role" || g.Metadata["role_arn"] != arn ||
		g.Metadata["session_duration"] != "3600" || !contains(g.Hosts, "sts.eu-west-1.amazonaws.com") {
		t.Fatalf("listed: %+v", g)
	}
	// The defaults replace it.
	role, err = moat.GrantAWS(moat.AWSGrantOptions{RoleARN: arn, Home: home})
	if err != nil || role.Region != "us-east-1" || role.SessionSeconds != 900 || role.ExternalID != "" {
		t.Fatalf("GrantAWS with the defaults: %+v, %v", role, err)
	}

	for _, bad := range []struct {
		opts moat.AWSGrantOptions
		want string
	}{
		{moat.AWSGrantOptions{RoleARN: "arn:aws:s3:::bucket"}, "not an IAM role ARN"},
		{moat.AWSGrantOptions{RoleARN: arn, Region: "EU West"}, "not an AWS region"},
		{moat.AWSGrantOptions{RoleARN: arn, SessionDuration: 5 * time.Minute}, "outside what STS allows"},
		{moat.AWSGrantOptions{RoleARN: arn, SessionDuration: -time.Hour}, "outside what STS allows"},
		{moat.AWSGrantOptions{RoleARN: arn, SessionDuration: 200 * 365 * 24 * time.Hour}, "outside what STS allows"},
	} {
		bad.opts.Home = home
		if _, err := moat.GrantAWS(bad.opts); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("GrantAWS %+v: %v, want %q", bad.opts, err, bad.want)
		}
	}
	removed, err := moat.Revoke("aws", home)
	if err != nil || !removed {
		t.Fatalf("Revoke aws: %v, %v", removed, err)
	}
	if grants, err := moat.Grants(home); err != nil || len(grants) != 0 {
		t.Fatalf("Grants after Revoke: %+v, %v", grants, err)
	}
}

// typeCount is how many entries of typ a report counts.
func typeCount(report *moat.AuditReport, typ string) uint64 {
	for _, tc := range report.Types {
		if tc.Type == typ {
			return tc.Count
		}
	}
	return 0
}

func TestAuditOfAProxy(t *testing.T) {
	home := t.TempDir()
	logDir := filepath.Join(home, "audit-log")
	addr, caFile := upstream(t)
	proxy, err := moat.StartProxy(moat.ProxyOptions{
		Home:        home,
		UpstreamCA:  caFile,
		Name:        "go-audit",
		AuditDir:    logDir,
		Resolve:     map[string]string{upstreamHost + ":443": addr},
		Credentials: []moat.Credential{{Host: upstreamHost, Header: "Authorization", Value: token, Grant: "github"}},
	})
	if err != nil {
		t.Fatalf("StartProxy: %v", err)
	}
	through(t, proxy, "https://"+upstreamHost+"/one")
	through(t, proxy, "https://"+upstreamHost+"/two")
	if err := proxy.Close(); err != nil {
		t.Fatal(err)
	}

	report, err := moat.VerifyAudit(logDir, home, "")
	if err != nil {
		t.Fatalf("VerifyAudit: %v", err)
	}
	if !report.OK || report.Entries == 0 || !strings.HasPrefix(report.VKey, "moat+") || report.Root == "" || len(report.Problems) != 0 {
		t.Fatalf("report: %s", report.Raw)
	}
	if n := typeCount(report, "credential_injected"); n != 2 {
		t.Fatalf("%d credential_injected entries: %s", n, report.Raw)
	}
	var total uint64
	for _, tc := range report.Types {
		total += tc.Count
	}
	if total != report.Entries {
		t.Fatalf("the types count %d entries of %d", total, report.Entries)
	}
	// Closed: its final checkpoint signs every entry.
	if len(report.Checkpoints) == 0 || !report.Closed || report.Unsigned != 0 {
		t.Fatalf("checkpoints: %s", report.Raw)
	}
	last := report.Checkpoints[len(report.Checkpoints)-1]
	if !last.Final || last.Size != report.Entries || last.Root != report.Root || !strings.HasPrefix(last.Origin, "moat/") {
		t.Fatalf("last checkpoint: %+v", last)
	}
	if strings.Contains(string(report.Raw), "go_SECRET") {
		t.Fatalf("the token is in the audit report")
	}
	// AuditTypeCount writes the pairs it reads.
	var doc struct {
		Types json.RawMessage `json:"types"`
	}
	if err := json.Unmarshal(report.Raw, &doc); err != nil {
		t.Fatal(err)
	}
	if again, err := json.Marshal(report.Types); err != nil || string(again) != string(doc.Types) {
		t.Fatalf("types %s, marshalled again %s (%v)", doc.Types, again, err)
	}

	// The verifier key given is the one the log is signed with.
	if _, err := moat.VerifyAudit(logDir, home, report.VKey); err != nil {
		t.Fatalf("VerifyAudit with its key: %v", err)
	}
	bundle := filepath.Join(t.TempDir(), "proof.json")
	if err := moat.ExportAudit(logDir, home, bundle); err != nil {
		t.Fatalf("ExportAudit: %v", err)
	}
	verified, err := moat.VerifyBundle(bundle, "")
	if err != nil {
		t.Fatalf("VerifyBundle: %v", err)
	}
	if verified.VKey != report.VKey || verified.Entries != report.Entries || verified.Root != report.Root || !verified.Closed {
		t.Fatalf("bundle report %s\nlog report %s", verified.Raw, report.Raw)
	}
	if _, err := moat.VerifyBundle(bundle, report.VKey); err != nil {
		t.Fatalf("VerifyBundle with the log's key: %v", err)
	}

	// Refusals: another key, a bundle changed, a file that is no bundle,
	// no file; a home that signed nothing, a key that does not parse, no
	// log; a log changed.
	_, err = moat.VerifyBundle(bundle, "moat+00000000+AAAA")
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "is not a moat verifier key") {
		t.Fatalf("VerifyBundle with a key that does not parse: %v", err)
	}
	data, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatal(err)
	}
	changed := filepath.Join(t.TempDir(), "changed.json")
	write(t, changed, strings.Replace(string(data), "/one", "/0ne", 1))
	if _, err := moat.VerifyBundle(changed, ""); !errors.Is(err, moat.StatusConfig) {
		t.Fatalf("VerifyBundle of a changed bundle: %v", err)
	}
	for _, text := range []string{"not json", `{"format": "something else"}`} {
		write(t, changed, text)
		if _, err := moat.VerifyBundle(changed, ""); !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "not a bundle") {
			t.Fatalf("VerifyBundle of a file that is no bundle (%s): %v", text, err)
		}
	}
	if _, err := moat.VerifyBundle(filepath.Join(home, "missing.json"), ""); !errors.Is(err, moat.StatusIO) {
		t.Fatalf("VerifyBundle of no file: %v", err)
	}
	_, err = moat.VerifyAudit(logDir, t.TempDir(), "")
	if !errors.Is(err, moat.StatusConfig) || !strings.Contains(err.Error(), "no audit signing key") {
		t.Fatalf("VerifyAudit with a home that signed nothing: %v", err)
	}
	if _, err := moat.VerifyAudit(logDir, home, "moat+00000000+AAAA"); !errors.Is(err, moat.StatusInvalidArgument) {
		t.Fatalf("VerifyAudit with a key that does not parse: %v", err)
	}
	_, err = moat.VerifyAudit(filepath.Join(home, "nowhere"), home, "")
	if !errors.Is(err, moat.StatusIO) || !strings.Contains(err.Error(), "no audit log here") {
		t.Fatalf("VerifyAudit of no log: %v", err)
	}
	if err := moat.ExportAudit(filepath.Join(home, "nowhere"), home, bundle); !errors.Is(err, moat.StatusIO) {
		t.Fatalf("ExportAudit of no log: %v", err)
	}
	logFile := filepath.Join(logDir, "audit.jsonl")
	entries, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(entries), "/one") {
		t.Fatalf("no /one in the log:\n%s", entries)
	}
	write(t, logFile, strings.Replace(string(entries), "/one", "/0ne", 1))
	_, err = moat.VerifyAudit(logDir, home, "")
	if !errors.Is(err, moat.StatusConfig) || !strings.Contains(err.Error(), "audit log "+logDir) {
		t.Fatalf("VerifyAudit of a changed log: %v", err)
	}
	if err := moat.ExportAudit(logDir, home, filepath.Join(t.TempDir(), "x.json")); !errors.Is(err, moat.StatusConfig) {
		t.Fatalf("ExportAudit of a changed log: %v", err)
	}
}

func TestDeps(t *testing.T) {
	raw, err := moat.Deps("")
	if err != nil {
		t.Fatalf("Deps: %v", err)
	}
	var all []struct {
		Name string `json:"name"`
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(raw, &all); err != nil {
		t.Fatalf("Deps: %v: %s", err, raw)
	}
	kinds := map[string]string{}
	for _, d := range all {
		kinds[d.Name] = d.Kind
	}
	if kinds["node"] != "runtime" || kinds["go"] != "runtime" || len(kinds) != len(all) {
		t.Fatalf("Deps: %s", raw)
	}

	raw, err = moat.Deps("go@1.22")
	if err != nil {
		t.Fatalf("Deps go@1.22: %v", err)
	}
	var one struct {
		Name, Version, Image string
	}
	if err := json.Unmarshal(raw, &one); err != nil || one.Name != "go" || one.Version != "1.22" || !strings.Contains(one.Image, "golang:1.22") {
		t.Fatalf("Deps go@1.22: %s (%v)", raw, err)
	}

	_, err = moat.Deps("nodejs")
	if !errors.Is(err, moat.StatusInvalidArgument) || !strings.Contains(err.Error(), "node") {
		t.Fatalf("Deps nodejs: %v", err)
	}
}

func TestResolveSecrets(t *testing.T) {
	// A 1Password CLI that knows one secret.
	bin := t.TempDir()
	write(t, filepath.Join(bin, "op"), "#!/bin/sh\n"+
		`[ "$1 $2 $3" = "read --no-newline op://Dev/Go/field" ] && { printf 'go-op-secret'; exit 0; }`+"\n"+
		"echo \"[ERROR] item not found\" >&2; exit 1\n")
	if err := os.Chmod(filepath.Join(bin, "op"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	ws := t.TempDir()
	file := filepath.Join(ws, "agent.yaml")

	write(t, file, "secrets:\n  TOKEN: op://Dev/Go/field\n")
	secrets, err := moat.ResolveSecrets(ws)
	if err != nil || len(secrets) != 1 || secrets["TOKEN"] != "go-op-secret" {
		t.Fatalf("ResolveSecrets: %v, %v", secrets, err)
	}
	// The configuration names the reference, never the value.
	if config, err := moat.LoadConfig(file); err != nil || strings.Contains(string(config.JSON), "go-op-secret") {
		t.Fatalf("LoadConfig: %v", err)
	}

	write(t, file, "secrets:\n  TOKEN: op://Dev/Go/field\n  OTHER: op://Dev/Missing/field\n")
	_, err = moat.ResolveSecrets(file)
	if !errors.Is(err, moat.StatusConfig) || !strings.Contains(err.Error(), "secret OTHER (1password)") || strings.Contains(err.Error(), "go-op-secret") {
		t.Fatalf("a secret op cannot read: %v", err)
	}

	write(t, file, "name: no-secrets\n")
	if secrets, err := moat.ResolveSecrets(ws); err != nil || secrets == nil || len(secrets) != 0 {
		t.Fatalf("no secrets: %v, %v", secrets, err)
	}
	write(t, file, "secrets:\n  TOKEN: vault://nope\n")
	var merr *moat.Error
	if _, err := moat.ResolveSecrets(ws); !errors.As(err, &merr) || merr.Status != moat.StatusConfig || merr.Problems[0].Path != file {
		t.Fatalf("an invalid configuration: %v", err)
	}
}
