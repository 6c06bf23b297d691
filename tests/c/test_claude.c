/* `moat claude` through the C ABI: the run options' Claude Code preset
 * ("agent" = "claude", "prompt"), the real Claude Code in the image moat
 * makes, answering through a local stand-in for Anthropic's API that the
 * run's proxy reaches (MOAT_RESOLVE, MOAT_UPSTREAM_CA_FILE, set by run.sh).
 * Usage: test_claude HOME MOAT_BINARY IMAGE WORKSPACE API_KEY */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
  char out[8192];
  size_t len;
};

static int on_output(void *user, const char *stream, const uint8_t *data, size_t len) {
  struct captured *c = user;
  if (strcmp(stream, "stdout") == 0 && c->len + len < sizeof c->out) {
    memcpy(c->out + c->len, data, len);
    c->len += len;
    c->out[c->len] = 0;
  }
  return 0;
}

/* A file's text (NUL-terminated), or NULL; free it. */
static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *text = NULL;
  size_t len = 0, cap = 0, n;
  char chunk[4096];
  while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
    if (len + n + 1 > cap) {
      cap = (len + n + 1) * 2;
      char *bigger = realloc(text, cap);
      if (!bigger) break;
      text = bigger;
    }
    memcpy(text + len, chunk, n);
    len += n;
  }
  fclose(f);
  if (text) text[len] = 0;
  return text;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: test_claude HOME MOAT IMAGE WORKSPACE API_KEY\n");
    return 2;
  }
  const char *home = argv[1], *moat = argv[2], *image = argv[3], *ws = argv[4], *key = argv[5];

  /* Without an anthropic grant: the error says what to do. */
  moat_run_options *o = moat_run_options_new(ws);
  CHECK(moat_run_options_set(o, "home", home, NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "supervisor", moat, NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "image", image, NULL) == MOAT_OK);
  moat_error *err = NULL;
  /* "prompt" before "agent" is refused, naming the fix. */
  CHECK(moat_run_options_set(o, "prompt", "x", &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "set \"agent\" to \"claude\""));
  moat_error_free(err);
  err = NULL;
  CHECK(moat_run_options_set(o, "agent", "codex", &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err && strstr(moat_error_message(err), "expected claude"));
  moat_error_free(err);
  CHECK(moat_run_options_set(o, "agent", "claude", NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "prompt", "hello from c", NULL) == MOAT_OK);
  moat_run *run = NULL;
  err = NULL;
  CHECK(moat_run_start(o, &run, &err) != MOAT_OK);
  CHECK(err && strstr(moat_error_message(err), "moat grant anthropic"));
  if (err) fprintf(stderr, "  (expected) %s\n", moat_error_message(err));
  moat_error_free(err);

  /* With the key granted: claude -p answers through the stand-in. */
  CHECK(moat_grant("anthropic", key, false, home, NULL, NULL) == MOAT_OK);
  run = NULL;
  err = NULL;
  CHECK(moat_run_start(o, &run, &err) == MOAT_OK);
  if (err) fprintf(stderr, "moat_run_start: %s\n", moat_error_message(err));
  moat_error_free(err);
  moat_run_options_free(o);
  if (run) {
    struct captured c = {0};
    CHECK(moat_run_follow(run, on_output, &c, NULL) == MOAT_OK);
    CHECK(strstr(c.out, "MOAT-STANDIN-REPLY: hello from c") != NULL);
    bool done = false;
    int64_t code = -1;
    CHECK(moat_run_wait(run, -1, &done, &code, NULL) == MOAT_OK);
    CHECK(done && code == 0);
    char *json = NULL;
    CHECK(moat_run_json(run, MOAT_RUN_INFO, &json, NULL) == MOAT_OK);
    CHECK(json && strstr(json, "\"agent\":\"claude\""));
    CHECK(json && strstr(json, "moat-claude:"));
    CHECK(json && !strstr(json, key));
    moat_string_free(json);
    /* Policy tools on the run: nothing changed; the suggestion names the API. */
    char *report = NULL;
    CHECK(moat_policy_check_json(moat_run_id(run), home, &report, NULL) == MOAT_OK);
    CHECK(report && strstr(report, "\"changes\":[]"));
    moat_string_free(report);
    char *yaml = NULL;
    CHECK(moat_policy_suggest(moat_run_id(run), home, &yaml, NULL) == MOAT_OK);
    CHECK(yaml && strstr(yaml, "policy: strict") && strstr(yaml, "api.anthropic.com"));
    CHECK(yaml && strstr(yaml, "allow POST /v1/messages"));
    moat_string_free(yaml);
    err = NULL;
    CHECK(moat_policy_suggest("no-such-run", home, &yaml, &err) == MOAT_ERR_INVALID_ARGUMENT);
    CHECK(err && strstr(moat_error_message(err), "no run matches"));
    moat_error_free(err);
    /* The run's trace as HAR 1.2: the API's requests, the key redacted. */
    char har_path[1024];
    snprintf(har_path, sizeof har_path, "%s/c-trace.har", home);
    size_t entries = 0;
    CHECK(moat_trace_har(moat_run_id(run), har_path, home, &entries, NULL) == MOAT_OK);
    CHECK(entries >= 1);
    char *har = read_file(har_path);
    CHECK(har && strstr(har, "\"version\": \"1.2\""));
    CHECK(har && strstr(har, "\"url\": \"https://api.anthropic.com/v1/messages"));
    CHECK(har && strstr(har, "\"value\": \"[redacted]\""));
    CHECK(har && !strstr(har, key));
    free(har);
    err = NULL;
    CHECK(moat_trace_har("no-such-run", har_path, home, NULL, &err) == MOAT_ERR_INVALID_ARGUMENT);
    CHECK(err && strstr(moat_error_message(err), "no run matches"));
    moat_error_free(err);
    CHECK(moat_trace_har(NULL, NULL, home, NULL, NULL) == MOAT_ERR_INVALID_ARGUMENT);
    CHECK(moat_run_destroy(run, NULL) == MOAT_OK);
    moat_run_free(run);
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
