/* Runs through the C ABI, against the real Docker engine and the local test
 * image: output through the log callback, the exit code, the run's JSON, its
 * audit log, errors for misuse and for an engine that does not answer.
 * Usage: test_run HOME MOAT_BINARY IMAGE WORKSPACE */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

struct captured {
  char out[4096];
  size_t out_len;
  char err[4096];
  size_t err_len;
};

static int on_output(void *user, const char *stream, const uint8_t *data, size_t len) {
  struct captured *c = user;
  char *buf = strcmp(stream, "stdout") == 0 ? c->out : c->err;
  size_t *used = strcmp(stream, "stdout") == 0 ? &c->out_len : &c->err_len;
  if (*used + len < sizeof c->out) {
    memcpy(buf + *used, data, len);
    *used += len;
    buf[*used] = 0;
  }
  return 0;
}

static moat_run_options *options(const char *home, const char *moat, const char *image,
                                 const char *workspace) {
  moat_run_options *o = moat_run_options_new(workspace);
  CHECK(o != NULL);
  CHECK(moat_run_options_set(o, "home", home, NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "supervisor", moat, NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "image", image, NULL) == MOAT_OK);
  return o;
}

/* Starts a run and frees its options; NULL (after a failed check) when it
 * did not start. */
static moat_run *start(moat_run_options *o) {
  moat_run *run = NULL;
  moat_error *err = NULL;
  moat_status st = moat_run_start(o, &run, &err);
  CHECK(st == MOAT_OK);
  moat_run_options_free(o);
  if (st != MOAT_OK) {
    fprintf(stderr, "moat_run_start: %s\n", err ? moat_error_message(err) : "?");
    moat_error_free(err);
    return NULL;
  }
  return run;
}

static void test_run(const char *home, const char *moat, const char *image,
                     const char *workspace) {
  moat_run_options *o = options(home, moat, image, workspace);
  CHECK(moat_run_options_set(o, "name", "c-run", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "sh", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "-c", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "echo \"out $GREETING\"; echo err >&2; exit 5", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "env", "GREETING=from-c", NULL) == MOAT_OK);
  /* The engine, named (the one the tests run on). */
  const char *engine = getenv("MOAT_RUNTIME");
  if (!engine || !*engine) engine = "docker";
  CHECK(moat_run_options_set(o, "runtime", engine, NULL) == MOAT_OK);
  moat_run *run = start(o);
  if (!run) return;
  CHECK(strncmp(moat_run_id(run), "run_", 4) == 0 && strlen(moat_run_id(run)) == 16);
  CHECK(strcmp(moat_run_name(run), "c-run") == 0);

  struct captured c = {0};
  CHECK(moat_run_follow(run, on_output, &c, NULL) == MOAT_OK);
  CHECK(strcmp(c.out, "out from-c\n") == 0);
  CHECK(strcmp(c.err, "err\n") == 0);

  bool done = false;
  int64_t code = 0;
  CHECK(moat_run_wait(run, -1, &done, &code, NULL) == MOAT_OK);
  CHECK(done);
  CHECK(code == 5);

  char *json = NULL;
  CHECK(moat_run_json(run, MOAT_RUN_INFO, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"state\":\"stopped\""));
  CHECK(json && strstr(json, "\"exit_code\":5"));
  char want_engine[64];
  snprintf(want_engine, sizeof want_engine, "\"engine\":\"%s\"", engine);
  CHECK(json && strstr(json, want_engine));
  /* Environment values are never kept in run.json, only names. */
  CHECK(json && !strstr(json, "from-c"));
  moat_string_free(json);
  moat_error *err = NULL;
  json = NULL;
  CHECK(moat_run_json(run, 7, &json, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(json == NULL && err && strstr(moat_error_message(err), "not a moat_run_doc"));
  moat_error_free(err);

  char *report = NULL;
  CHECK(moat_audit_verify(moat_run_dir(run), home, NULL, &report, NULL) == MOAT_OK);
  CHECK(report && strstr(report, "run_stopped"));
  moat_string_free(report);

  /* Promoted to a directory of ours, listed by system, found by a dry
     clean (which removes nothing). */
  char to[600];
  snprintf(to, sizeof to, "%s/promoted-c", home);
  json = NULL;
  CHECK(moat_promote_json("c-run", to, home, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "promoted-c") && strstr(json, "audit-bundle.json"));
  moat_string_free(json);
  char kept[700];
  snprintf(kept, sizeof kept, "%s/promoted.json", to);
  CHECK(access(kept, F_OK) == 0);
  json = NULL;
  CHECK(moat_system_json("containers", false, home, &json, NULL) == MOAT_OK);
  CHECK(json && json[0] == '[');
  moat_string_free(json);
  err = NULL;
  json = NULL;
  CHECK(moat_system_json("volumes", false, home, &json, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(json == NULL && err && strstr(moat_error_message(err), "volumes"));
  moat_error_free(err);
  json = NULL;
  CHECK(moat_clean_json(home, true, true, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, moat_run_id(run)) && strstr(json, "\"images\":[]"));
  moat_string_free(json);
  CHECK(access(moat_run_dir(run), F_OK) == 0);
  json = NULL;
  CHECK(moat_deps_json(NULL, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"name\":\"node\"") && strstr(json, "\"name\":\"go\""));
  moat_string_free(json);
  json = NULL;
  CHECK(moat_deps_json("go@1.22", &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "golang"));
  moat_string_free(json);
  err = NULL;
  CHECK(moat_deps_json("nodejs", &json, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "node"));
  moat_error_free(err);

  /* Reopened by name, then destroyed: the directory goes. */
  moat_run *again = NULL;
  CHECK(moat_run_open("c-run", home, &again, NULL) == MOAT_OK);
  CHECK(again && strcmp(moat_run_id(again), moat_run_id(run)) == 0);
  CHECK(moat_run_destroy(again, NULL) == MOAT_OK);
  moat_run_free(again);
  err = NULL;
  CHECK(moat_run_open(moat_run_id(run), home, &again, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "no run matches"));
  moat_error_free(err);
  moat_run_free(run);
}

/* A run with ports: the URL is in MOAT_URL_WEB inside and in the run's JSON. */
static void test_urls(const char *home, const char *moat, const char *image,
                      const char *workspace) {
  char dir[1024], yaml[1100];
  snprintf(dir, sizeof dir, "%s/with-ports", workspace);
  mkdir(dir, 0755);
  snprintf(yaml, sizeof yaml, "%s/agent.yaml", dir);
  FILE *f = fopen(yaml, "w");
  CHECK(f != NULL);
  if (!f) return;
  fputs("name: c-web\nports:\n  web: 3000\n", f);
  fclose(f);
  setenv("MOAT_PROXY_PORT", "18597", 1);
  moat_run_options *o = options(home, moat, image, dir);
  CHECK(moat_run_options_add(o, "arg", "sh", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "-c", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "echo $MOAT_URL_WEB", NULL) == MOAT_OK);
  moat_run *run = start(o);
  if (!run) return;
  struct captured c = {0};
  CHECK(moat_run_follow(run, on_output, &c, NULL) == MOAT_OK);
  CHECK(strcmp(c.out, "https://web.c-web.localhost:18597\n") == 0);
  char *json = NULL;
  CHECK(moat_run_json(run, MOAT_RUN_INFO, &json, NULL) == MOAT_OK);
  CHECK(json && strstr(json, "\"urls\":{\"web\":\"https://web.c-web.localhost:18597\"}"));
  moat_string_free(json);
  CHECK(moat_run_destroy(run, NULL) == MOAT_OK);
  moat_run_free(run);
  unsetenv("MOAT_PROXY_PORT");
}

/* An ssh: grant in a run: the run's filtering agent signs for the granted
 * host's real sshd (run.sh starts it and an ssh-agent with two keys, and
 * names the host in MOAT_TEST_SSH_HOST), and lists only the granted key. */
static void test_ssh(const char *home, const char *moat, const char *image,
                     const char *workspace) {
  const char *host = getenv("MOAT_TEST_SSH_HOST");
  CHECK(host != NULL);
  if (!host) return;
  char *json = NULL;
  moat_error *err = NULL;
  CHECK(moat_grant_ssh(host, NULL, home, &json, &err) == MOAT_OK);
  CHECK(json && strstr(json, "\"host_keys\":[\"ssh-ed25519 "));
  moat_string_free(json);
  moat_error_free(err);
  char grant[300];
  snprintf(grant, sizeof grant, "ssh:%s", host);
  char script[600];
  snprintf(script, sizeof script,
           "ssh-add -l | wc -l; ssh -o BatchMode=yes root@%s; echo ssh=$?", host);
  moat_run_options *o = options(home, moat, image, workspace);
  CHECK(moat_run_options_add(o, "grant", grant, NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "sh", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "-c", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", script, NULL) == MOAT_OK);
  moat_run *run = start(o);
  if (!run) return;
  struct captured c = {0};
  CHECK(moat_run_follow(run, on_output, &c, NULL) == MOAT_OK);
  /* Two keys in the user's agent, one granted. */
  const char *want = "1\nhello from c-sshd\nssh=0\n";
  CHECK(strcmp(c.out, want) == 0);
  if (strcmp(c.out, want) != 0) fprintf(stderr, "ssh run printed: %s / %s\n", c.out, c.err);
  char *report = NULL;
  CHECK(moat_audit_verify(moat_run_dir(run), home, NULL, &report, NULL) == MOAT_OK);
  CHECK(report && strstr(report, "ssh_agent"));
  moat_string_free(report);
  CHECK(moat_run_destroy(run, NULL) == MOAT_OK);
  moat_run_free(run);
}

static void test_misuse(const char *home, const char *moat, const char *image,
                        const char *workspace) {
  moat_error *err = NULL;
  /* The moat home itself is never a workspace: it holds the CA key. */
  moat_run_options *o = options(home, moat, image, home);
  CHECK(moat_run_options_add(o, "arg", "true", NULL) == MOAT_OK);
  moat_run *run = NULL;
  CHECK(moat_run_start(o, &run, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "moat's own files"));
  moat_error_free(err);
  moat_run_options_free(o);
  err = NULL;
  o = options(home, moat, image, workspace);
  CHECK(moat_run_options_set(o, "colour", "blue", &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "unknown run option \"colour\""));
  moat_error_free(err);
  err = NULL;
  CHECK(moat_run_options_add(o, "env", "NOEQUALS", &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "KEY=VALUE"));
  moat_error_free(err);
  err = NULL;
  CHECK(moat_run_options_set(o, "runtime", "kubernetes", NULL) == MOAT_OK);
  CHECK(moat_run_start(o, &run, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "\"kubernetes\" is not a container engine"));
  /* Named as the option (the configuration's field), never as a CLI flag. */
  CHECK(err && strncmp(moat_error_message(err), "runtime: ", 9) == 0);
  CHECK(err && !strstr(moat_error_message(err), "--runtime"));
  CHECK(run == NULL);
  moat_error_free(err);
  err = NULL;
  CHECK(moat_run_options_set(o, "runtime", "docker", NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "policy", "lenient", NULL) == MOAT_OK);
  CHECK(moat_run_start(o, &run, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "network.policy: "));
  CHECK(run == NULL);
  moat_error_free(err);
  moat_run_options_free(o);
  CHECK(moat_run_start(NULL, &run, NULL) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(moat_run_id(NULL) == NULL);
  moat_run_free(NULL);
  moat_run_options_free(NULL);

  /* No engine at DOCKER_HOST (or CONTAINER_HOST, for Podman): a runtime
     error that says what to start. */
  const char *engine = getenv("MOAT_RUNTIME");
  int podman = engine && strcmp(engine, "podman") == 0;
  setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock", 1);
  setenv("CONTAINER_HOST", "unix:///nonexistent/podman.sock", 1);
  o = options(home, moat, image, workspace);
  CHECK(moat_run_options_add(o, "arg", "true", NULL) == MOAT_OK);
  err = NULL;
  CHECK(moat_run_start(o, &run, &err) == MOAT_ERR_RUNTIME);
  CHECK(err && strstr(moat_error_message(err), podman ? "Podman engine" : "Docker engine"));
  CHECK(err && strstr(moat_error_message(err), podman ? "Start Podman" : "Start Docker"));
  moat_error_free(err);
  moat_run_options_free(o);
  unsetenv("DOCKER_HOST");
  unsetenv("CONTAINER_HOST");
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s HOME MOAT_BINARY IMAGE WORKSPACE\n", argv[0]);
    return 2;
  }
  test_run(argv[1], argv[2], argv[3], argv[4]);
  test_urls(argv[1], argv[2], argv[3], argv[4]);
  test_ssh(argv[1], argv[2], argv[3], argv[4]);
  test_misuse(argv[1], argv[2], argv[3], argv[4]);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
