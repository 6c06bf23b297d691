/* The proxy through the C ABI, against a real local HTTPS upstream and curl.
 * Usage: test_proxy SCRATCH_DIR UPSTREAM_PORT UPSTREAM_CA_PEM */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "moat.h"

static int passed = 0, failed = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (cond) {                                                            \
      passed++;                                                            \
    } else {                                                               \
      failed++;                                                            \
      fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
    }                                                                      \
  } while (0)

#define TOKEN "Bearer c_SECRET_token_0123456789"

static char *run_curl(const char *proxy_url, const char *ca, const char *url) {
  char cmd[2048];
  snprintf(cmd, sizeof cmd,
           "curl -sS --max-time 20 --proxy '%s' --cacert '%s' '%s'",
           proxy_url, ca, url);
  FILE *p = popen(cmd, "r");
  if (!p) return NULL;
  static char out[8192];
  size_t n = fread(out, 1, sizeof out - 1, p);
  out[n] = 0;
  pclose(p);
  return out;
}

static moat_proxy_options *options(const char *home, const char *port, const char *ca) {
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%s", port);
  moat_proxy_options *o = moat_proxy_options_new();
  CHECK(moat_proxy_options_set(o, "home", home, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_set(o, "upstream_ca", ca, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_set(o, "name", "c-test", NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_resolve(o, "api.github.com:443", addr, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_resolve(o, "other.test:443", addr, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_credential(o, "api.github.com", "Authorization", TOKEN,
                                          "github", NULL) == MOAT_OK);
  return o;
}

static void test_injection(const char *home, const char *port, const char *ca) {
  moat_proxy_options *o = options(home, port, ca);
  char log[700];
  snprintf(log, sizeof log, "%s/audit-log", home);
  CHECK(moat_proxy_options_set(o, "audit_dir", log, NULL) == MOAT_OK);
  moat_proxy *proxy = NULL;
  moat_error *err = NULL;
  CHECK(moat_proxy_start(o, &proxy, &err) == MOAT_OK);
  moat_proxy_options_free(o);
  if (!proxy) {
    fprintf(stderr, "start failed: %s\n", err ? moat_error_message(err) : "?");
    moat_error_free(err);
    return;
  }
  const char *url = moat_proxy_url(proxy);
  CHECK(strncmp(url, "http://moat:", 12) == 0);
  CHECK(strncmp(moat_proxy_address(proxy), "127.0.0.1:", 10) == 0);
  CHECK(access(moat_proxy_ca_cert_path(proxy), R_OK) == 0);

  char *out = run_curl(url, moat_proxy_ca_cert_path(proxy), "https://api.github.com/from-c");
  CHECK(out && strstr(out, TOKEN) != NULL); /* the upstream echoes what it saw */
  out = run_curl(url, moat_proxy_ca_cert_path(proxy), "https://other.test/from-c");
  CHECK(out && strstr(out, "\"authorization\": []") != NULL);

  char *json = NULL;
  CHECK(moat_proxy_json(proxy, MOAT_PROXY_ENV, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"HTTPS_PROXY\"") && strstr(json, "\"SSL_CERT_FILE\""));
  moat_string_free(json);

  CHECK(moat_proxy_close(proxy, NULL) == MOAT_OK);
  CHECK(moat_proxy_close(proxy, NULL) == MOAT_OK); /* twice is fine */

  json = NULL;
  CHECK(moat_proxy_json(proxy, MOAT_PROXY_TRACE, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"grant\":\"github\"") != NULL);
  CHECK(json && strstr(json, "\"client\":\"c-test\"") != NULL);
  CHECK(json && strstr(json, "c_SECRET_token") == NULL);
  moat_string_free(json);
  json = NULL;
  CHECK(moat_proxy_json(proxy, MOAT_PROXY_AUDIT, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "credential_injected") != NULL);
  CHECK(json && strstr(json, "c_SECRET_token") == NULL);
  moat_string_free(json);
  moat_proxy_free(proxy);

  /* The tamper-evident log the proxy wrote, verified and exported. */
  json = NULL;
  CHECK(moat_audit_verify(log, home, NULL, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"ok\":true") && strstr(json, "credential_injected"));
  moat_string_free(json);
  char bundle[800];
  snprintf(bundle, sizeof bundle, "%s/proof.json", home);
  CHECK(moat_audit_export(log, home, bundle, NULL) == MOAT_OK);
  json = NULL;
  CHECK(moat_verify_bundle(bundle, NULL, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"vkey\":\"moat+") != NULL);
  moat_string_free(json);
  moat_error *err2 = NULL;
  /* A key that does not parse is an invalid argument (as for moat_audit_verify). */
  CHECK(moat_verify_bundle(bundle, "moat+00000000+AAAA", NULL, &err2) == MOAT_ERR_INVALID_ARGUMENT);
  moat_error_free(err2);
  /* A home that signed nothing has no key to verify with. */
  char other[800];
  snprintf(other, sizeof other, "%s/other-home", home);
  err2 = NULL;
  CHECK(moat_audit_verify(log, other, NULL, NULL, &err2) == MOAT_ERR_CONFIG);
  CHECK(err2 && strstr(moat_error_message(err2), "no audit signing key"));
  moat_error_free(err2);
  /* A made-up key does not parse; a missing log is an error. */
  err2 = NULL;
  CHECK(moat_audit_verify(log, home, "moat+00000000+AAAA", NULL, &err2) == MOAT_ERR_INVALID_ARGUMENT);
  moat_error_free(err2);
  err2 = NULL;
  CHECK(moat_audit_verify("/nonexistent/log", home, NULL, NULL, &err2) == MOAT_ERR_IO);
  CHECK(err2 && strstr(moat_error_message(err2), "no audit log here"));
  moat_error_free(err2);
}

/* Request rules: a strict proxy judges each request to a host with rules by
   method and path (normalised), inside the intercepted TLS. */
static void test_rules(const char *home, const char *port, const char *ca) {
  moat_proxy_options *o = options(home, port, ca);
  CHECK(moat_proxy_options_set(o, "policy", "strict", NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_rule(o, "other.test", "deny * /admin/**", NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_rule(o, "other.test", "allow GET /**", NULL) == MOAT_OK);
  moat_error *err = NULL;
  CHECK(moat_proxy_options_add_rule(o, "other.test", "allow GET nope", &err) ==
        MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "must start with /"));
  moat_error_free(err);
  err = NULL;
  CHECK(moat_proxy_options_add_rule(o, "bad host!", NULL, &err) == MOAT_ERR_INVALID_ARGUMENT);
  moat_error_free(err);
  /* One host in two entries: refused at start, not half read. */
  moat_proxy_options *twice = options(home, port, ca);
  CHECK(moat_proxy_options_add_rule(twice, "other.test", "allow GET /**", NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_rule(twice, "x.test", NULL, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_rule(twice, "other.test", "deny * /**", NULL) == MOAT_OK);
  moat_proxy *never = NULL;
  err = NULL;
  CHECK(moat_proxy_start(twice, &never, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(never == NULL);
  CHECK(err && strstr(moat_error_message(err), "other.test is listed twice"));
  moat_error_free(err);
  moat_proxy_options_free(twice);
  moat_proxy *proxy = NULL;
  CHECK(moat_proxy_start(o, &proxy, NULL) == MOAT_OK);
  moat_proxy_options_free(o);
  if (!proxy) return;
  const char *url = moat_proxy_url(proxy), *mca = moat_proxy_ca_cert_path(proxy);
  char *out = run_curl(url, mca, "https://other.test/ok");
  CHECK(out && strstr(out, "\"path\": \"/ok\"") != NULL);
  out = run_curl(url, mca, "https://other.test//ADMIN;x/%73ettings");
  CHECK(out && strstr(out, "The rule \"deny * /admin/**\" for other.test denies it."));
  /* A dot segment is refused, not resolved (servers resolve them apart). */
  out = run_curl(url, mca, "https://other.test/x/%2e%2e/admin");
  CHECK(out && strstr(out, "request blocked by network policy") && strstr(out, "a . or .. segment"));
  char *json = NULL;
  CHECK(moat_proxy_json(proxy, MOAT_PROXY_TRACE, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"rule\":\"deny * /admin/**\""));
  CHECK(json && strstr(json, "\"rule\":\"allow GET /**\""));
  moat_string_free(json);
  moat_proxy_free(proxy);
}

/* The in-memory trace keeps the newest records within trace_limit and says
   how many it dropped. */
static void test_bounded_trace(const char *home, const char *port, const char *ca) {
  moat_proxy_options *o = options(home, port, ca);
  CHECK(moat_proxy_options_set(o, "trace_limit", "2", NULL) == MOAT_OK);
  CHECK(moat_proxy_options_set(o, "trace_bytes", "1048576", NULL) == MOAT_OK);
  moat_error *err = NULL;
  CHECK(moat_proxy_options_set(o, "trace_limit", "lots", &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "trace_limit") != NULL);
  moat_error_free(err);
  moat_proxy *proxy = NULL;
  CHECK(moat_proxy_start(o, &proxy, NULL) == MOAT_OK);
  moat_proxy_options_free(o);
  if (!proxy) return;
  for (int i = 0; i < 5; i++) {
    char target[128];
    snprintf(target, sizeof target, "https://api.github.com/bounded-%d", i);
    CHECK(run_curl(moat_proxy_url(proxy), moat_proxy_ca_cert_path(proxy), target) != NULL);
  }
  char *json = NULL;
  CHECK(moat_proxy_json(proxy, MOAT_PROXY_TRACE, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "bounded-4") && strstr(json, "bounded-3") && !strstr(json, "bounded-2"));
  moat_string_free(json);
  json = NULL;
  CHECK(moat_proxy_json(proxy, MOAT_PROXY_STATS, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"dropped_records\":3") != NULL);
  moat_string_free(json);
  json = NULL;
  err = NULL;
  CHECK(moat_proxy_json(proxy, 99, &json, &err) == MOAT_ERR_INVALID_ARGUMENT && json == NULL);
  moat_error_free(err);
  moat_proxy_free(proxy);
}

static void test_misuse(const char *home) {
  moat_proxy_options *o = moat_proxy_options_new();
  moat_error *err = NULL;
  CHECK(moat_proxy_options_set(o, "colour", "blue", &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "unknown proxy option \"colour\""));
  moat_error_free(err);

  err = NULL;
  CHECK(moat_proxy_options_add_credential(o, "api.github.com", "Authorization",
                                          "Bearer sec\nret", NULL, &err) ==
        MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "sec") == NULL);
  moat_error_free(err);

  CHECK(moat_proxy_options_set(o, "home", home, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_set(o, "policy", "paranoid", NULL) == MOAT_OK);
  moat_proxy *proxy = NULL;
  err = NULL;
  CHECK(moat_proxy_start(o, &proxy, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(proxy == NULL);
  CHECK(err && strstr(moat_error_message(err), "policy: unknown network policy"));
  moat_error_free(err);
  moat_proxy_options_free(o);

  CHECK(moat_proxy_start(NULL, &proxy, NULL) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(moat_proxy_url(NULL) == NULL);
  CHECK(moat_proxy_close(NULL, NULL) == MOAT_ERR_INVALID_ARGUMENT);
  moat_proxy_free(NULL);
  moat_proxy_options_free(NULL);
}

static void test_grants(const char *scratch, const char *port, const char *ca) {
  char home[600];
  snprintf(home, sizeof home, "%s/grants-home", scratch);
  char *json = NULL;
  moat_error *err = NULL;
  CHECK(moat_grant("github", "ghp_C_GRANT_secret_0123456789", false, home, &json, &err) == MOAT_OK);
  CHECK(json && strstr(json, "\"provider\":\"github\"") != NULL);
  CHECK(json && strstr(json, "ghp_C_GRANT") == NULL);
  moat_string_free(json);

  json = NULL;
  CHECK(moat_grants_json(home, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"source\":\"api\"") && strstr(json, "ghp_C_GRANT") == NULL);
  moat_string_free(json);

  /* A proxy that injects the stored grant. */
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%s", port);
  moat_proxy_options *o = moat_proxy_options_new();
  CHECK(moat_proxy_options_set(o, "home", home, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_set(o, "upstream_ca", ca, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_resolve(o, "api.github.com:443", addr, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_grant(o, "github", NULL) == MOAT_OK);
  moat_proxy *proxy = NULL;
  CHECK(moat_proxy_start(o, &proxy, NULL) == MOAT_OK);
  moat_proxy_options_free(o);
  if (proxy) {
    char *out = run_curl(moat_proxy_url(proxy), moat_proxy_ca_cert_path(proxy),
                         "https://api.github.com/granted");
    CHECK(out && strstr(out, "Bearer ghp_C_GRANT_secret_0123456789") != NULL);
    moat_proxy_free(proxy);
  }

  bool removed = false;
  CHECK(moat_revoke("github", home, &removed, NULL) == MOAT_OK);
  CHECK(removed);
  CHECK(moat_revoke("github", home, &removed, NULL) == MOAT_OK);
  CHECK(!removed);

  err = NULL;
  CHECK(moat_grant("githb", "x", false, home, NULL, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "did you mean \"github\""));
  moat_error_free(err);
  err = NULL;
  CHECK(moat_grant("openai", NULL, false, home, NULL, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "OPENAI_API_KEY"));
  moat_error_free(err);
}

/* run.sh starts an ssh-agent holding one key (comment c-test@moat). */
static void test_ssh_grant(const char *scratch) {
  char home[600];
  snprintf(home, sizeof home, "%s/ssh-home", scratch);
  char *json = NULL;
  moat_error *err = NULL;
  CHECK(moat_grant_ssh("github.com", NULL, home, &json, &err) == MOAT_OK);
  CHECK(json && strstr(json, "\"fingerprint\":\"SHA256:") != NULL);
  CHECK(json && strstr(json, "c-test@moat") != NULL);
  moat_string_free(json);
  if (err) moat_error_free(err);
  err = NULL;
  CHECK(moat_grant_ssh("github.com", "SHA256:nope", home, NULL, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "holds no such key"));
  moat_error_free(err);
  bool removed = false;
  CHECK(moat_revoke("ssh:github.com", home, &removed, NULL) == MOAT_OK && removed);
  CHECK(moat_grant_ssh(NULL, NULL, home, NULL, NULL) == MOAT_ERR_INVALID_ARGUMENT);
}

static void test_aws_grant(const char *scratch) {
  char home[600];
  snprintf(home, sizeof home, "%s/aws-home", scratch);
  char *json = NULL;
  CHECK(moat_grant_aws("arn:aws:iam::123456789012:role/AgentRole", "eu-west-1", 3600, NULL, home,
                       &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"region\":\"eu-west-1\"") && strstr(json, "\"session_duration\":3600"));
  moat_string_free(json);
  json = NULL;
  CHECK(moat_grants_json(home, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"provider\":\"aws\"") != NULL);
  moat_string_free(json);

  /* run.sh clears the AWS variables: a proxy cannot assume the role. */
  moat_proxy_options *o = moat_proxy_options_new();
  CHECK(moat_proxy_options_set(o, "home", home, NULL) == MOAT_OK);
  CHECK(moat_proxy_options_add_grant(o, "aws", NULL) == MOAT_OK);
  moat_proxy *proxy = NULL;
  moat_error *err = NULL;
  CHECK(moat_proxy_start(o, &proxy, &err) == MOAT_ERR_CONFIG);
  CHECK(err && strstr(moat_error_message(err), "no AWS credentials on this host"));
  moat_error_free(err);
  moat_proxy_options_free(o);

  err = NULL;
  CHECK(moat_grant_aws("arn:aws:s3:::bucket", NULL, 0, NULL, home, NULL, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "not an IAM role ARN"));
  moat_error_free(err);
  bool removed = false;
  CHECK(moat_revoke("aws", home, &removed, NULL) == MOAT_OK && removed);
}

/* An empty home is the default (as an empty MOAT_HOME is), never the
   current directory; moat in a child forked after it started says so at
   once instead of waiting forever for threads the child does not have. */
static void test_home_and_fork(const char *scratch) {
  char cwd[4096], here[4096], fallback[4096];
  CHECK(getcwd(cwd, sizeof cwd) != NULL);
  snprintf(here, sizeof here, "%s/empty-home-cwd", scratch);
  snprintf(fallback, sizeof fallback, "%s/default-home", scratch);
  mkdir(here, 0700);
  CHECK(chdir(here) == 0);
  const char *old = getenv("MOAT_HOME");
  char *saved = old ? strdup(old) : NULL;
  setenv("MOAT_HOME", fallback, 1);
  char *json = NULL;
  CHECK(moat_grants_json("", &json, NULL) == MOAT_OK);
  moat_string_free(json);
  int entries = 0;
  DIR *d = opendir(here);
  CHECK(d != NULL);
  for (struct dirent *e; d && (e = readdir(d));)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) entries++;
  if (d) closedir(d);
  CHECK(entries == 0);
  if (saved) { setenv("MOAT_HOME", saved, 1); free(saved); } else unsetenv("MOAT_HOME");
  CHECK(chdir(cwd) == 0);

  moat_proxy_options *o = moat_proxy_options_new();
  CHECK(moat_proxy_options_set(o, "home", fallback, NULL) == MOAT_OK);
  moat_proxy *proxy = NULL;
  CHECK(moat_proxy_start(o, &proxy, NULL) == MOAT_OK);
  pid_t pid = fork();
  if (pid == 0) {
    moat_proxy *child = NULL;
    moat_error *err = NULL;
    int ok = moat_proxy_start(o, &child, &err) == MOAT_ERR_INVALID_ARGUMENT && child == NULL &&
             err && strstr(moat_error_message(err), "forked");
    _exit(ok ? 0 : 1);
  }
  int status = -1, waited = 0;
  for (int i = 0; i < 200 && !waited; i++) {
    waited = waitpid(pid, &status, WNOHANG) == pid;
    if (!waited) nanosleep(&(struct timespec){0, 100000000}, NULL);
  }
  if (!waited) { kill(pid, SIGKILL); waitpid(pid, &status, 0); }
  CHECK(waited && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(moat_proxy_close(proxy, NULL) == MOAT_OK);
  moat_proxy_free(proxy);
  moat_proxy_options_free(o);
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s SCRATCH_DIR UPSTREAM_PORT UPSTREAM_CA\n", argv[0]);
    return 2;
  }
  test_injection(argv[1], argv[2], argv[3]);
  test_bounded_trace(argv[1], argv[2], argv[3]);
  test_rules(argv[1], argv[2], argv[3]);
  test_misuse(argv[1]);
  test_grants(argv[1], argv[2], argv[3]);
  test_ssh_grant(argv[1]);
  test_aws_grant(argv[1]);
  test_home_and_fork(argv[1]);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
