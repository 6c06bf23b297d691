/* The C surface of libmoat, compiled against the committed include/moat.h.
 * Usage: test_config <scratch-dir>   (prints "N passed, M failed") */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f) { perror(path); exit(2); }
  fputs(text, f);
  fclose(f);
}

static void test_version(void) {
  char expected[64];
  snprintf(expected, sizeof expected, "%d.%d.%d", MOAT_VERSION_MAJOR,
           MOAT_VERSION_MINOR, MOAT_VERSION_PATCH);
  CHECK(strcmp(moat_version(), expected) == 0);
}

/* A closed connection must not end a C program: the first libmoat call
   that can fail leaves SIGPIPE ignored (it was at its default). */
static void test_sigpipe_ignored(const char *dir) {
  void (*before)(int) = signal(SIGPIPE, SIG_DFL);
  CHECK(before == SIG_DFL);
  moat_config *cfg = NULL;
  CHECK(moat_config_load(dir, &cfg, NULL) == MOAT_OK);
  moat_config_free(cfg);
  void (*after)(int) = signal(SIGPIPE, SIG_IGN);
  CHECK(after == SIG_IGN);
}

static void test_valid(const char *dir) {
  char ws[512], file[600];
  snprintf(ws, sizeof ws, "%s/valid", dir);
  mkdir(ws, 0700);
  snprintf(file, sizeof file, "%s/agent.yaml", ws);
  write_file(file, "name: c-agent\ndependencies: [go@1.22]\nports:\n  web: 3000\n");

  moat_config *cfg = NULL;
  moat_error *err = NULL;
  moat_status st = moat_config_load(ws, &cfg, &err);
  CHECK(st == MOAT_OK);
  CHECK(err == NULL);
  CHECK(cfg != NULL);
  if (!cfg) return;
  CHECK(strcmp(moat_config_name(cfg), "c-agent") == 0);
  CHECK(strcmp(moat_config_image(cfg), "golang:1.22-bookworm") == 0);

  char *json = NULL;
  CHECK(moat_config_to_json(cfg, &json, NULL) == MOAT_OK);
  CHECK(json != NULL && strstr(json, "\"web\":3000") != NULL);
  CHECK(json != NULL && strstr(json, "\"image\":\"golang:1.22-bookworm\"") != NULL);
  moat_string_free(json);
  moat_config_free(cfg);
}

static void test_defaults(const char *dir) {
  char ws[512];
  snprintf(ws, sizeof ws, "%s/empty", dir);
  mkdir(ws, 0700);
  moat_config *cfg = NULL;
  CHECK(moat_config_load(ws, &cfg, NULL) == MOAT_OK);
  CHECK(cfg != NULL && moat_config_name(cfg) == NULL);
  CHECK(cfg != NULL && strcmp(moat_config_image(cfg), "ubuntu:22.04") == 0);
  moat_config_free(cfg);
}

static void test_invalid(const char *dir) {
  char ws[512], file[600];
  snprintf(ws, sizeof ws, "%s/invalid", dir);
  mkdir(ws, 0700);
  snprintf(file, sizeof file, "%s/agent.yaml", ws);
  write_file(file, "name: ok\nports:\n  web: 70000\n");

  moat_config *cfg = NULL;
  moat_error *err = NULL;
  moat_status st = moat_config_load(ws, &cfg, &err);
  CHECK(st == MOAT_ERR_CONFIG);
  CHECK(cfg == NULL); /* outputs are written only on success */
  CHECK(err != NULL);
  if (!err) return;
  CHECK(moat_error_status(err) == MOAT_ERR_CONFIG);
  CHECK(strcmp(moat_error_path(err), file) == 0);
  CHECK(moat_error_line(err) == 3);
  CHECK(moat_error_column(err) == 8);
  CHECK(strstr(moat_error_message(err), "port 70000 is out of range") != NULL);
  CHECK(strncmp(moat_error_message(err), file, strlen(file)) == 0);
  moat_error_free(err);
}

static void test_several_errors_with_their_parts(const char *dir) {
  char ws[512], file[600];
  snprintf(ws, sizeof ws, "%s/several", dir);
  mkdir(ws, 0700);
  snprintf(file, sizeof file, "%s/agent.yaml", ws);
  write_file(file, "name: ok\nports:\n  web: 70000\nnetwork:\n  policy: sometimes\n");

  moat_config *cfg = NULL;
  moat_error *err = NULL;
  CHECK(moat_config_load(ws, &cfg, &err) == MOAT_ERR_CONFIG);
  CHECK(err != NULL);
  if (!err) return;
  CHECK(moat_error_count(err) == 2);
  /* The parts: a message without the location, and the location apart. */
  CHECK(strcmp(moat_error_item_path(err, 0), file) == 0);
  CHECK(moat_error_item_line(err, 0) == 3 && moat_error_item_column(err, 0) == 8);
  CHECK(strstr(moat_error_item_message(err, 0), "port 70000 is out of range") != NULL);
  CHECK(strstr(moat_error_item_message(err, 0), file) == NULL);
  CHECK(strcmp(moat_error_item_path(err, 1), file) == 0);
  CHECK(moat_error_item_line(err, 1) == 5);
  CHECK(strstr(moat_error_item_message(err, 1), "sometimes") != NULL);
  /* Out of range: NULL and 0, never a crash. */
  CHECK(moat_error_item_message(err, 2) == NULL && moat_error_item_path(err, 2) == NULL);
  CHECK(moat_error_item_line(err, 99) == 0 && moat_error_item_column(err, 99) == 0);
  /* The full message has both problems, one per line, each located. */
  const char *all = moat_error_message(err);
  CHECK(strstr(all, "out of range") != NULL && strstr(all, "sometimes") != NULL);
  CHECK(strchr(all, '\n') != NULL);
  moat_error_free(err);

  /* An error without a location has one part, unlocated. */
  err = NULL;
  CHECK(moat_config_load(NULL, &cfg, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(moat_error_count(err) == 1 && moat_error_item_path(err, 0) == NULL);
  CHECK(strcmp(moat_error_item_message(err, 0), "workspace is NULL") == 0);
  moat_error_free(err);
  CHECK(moat_error_count(NULL) == 0 && moat_error_item_message(NULL, 0) == NULL);
}

static void test_misuse(void) {
  moat_config *cfg = NULL;
  moat_error *err = NULL;
  CHECK(moat_config_load(NULL, &cfg, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(err != NULL && moat_error_path(err) == NULL && moat_error_line(err) == 0);
  CHECK(err != NULL && strstr(moat_error_message(err), "workspace is NULL") != NULL);
  moat_error_free(err);

  err = NULL;
  CHECK(moat_config_load("/nonexistent/moat", &cfg, &err) == MOAT_ERR_IO);
  CHECK(err != NULL && strstr(moat_error_message(err), "no such file or directory") != NULL);
  moat_error_free(err);

  CHECK(moat_config_to_json(NULL, NULL, NULL) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(moat_config_name(NULL) == NULL);
  CHECK(moat_error_message(NULL) == NULL);
  moat_config_free(NULL);
  moat_error_free(NULL);
  moat_string_free(NULL);
}

/* run.sh puts a fake `op` on PATH that answers op://Dev/C/field. */
static void test_secrets(const char *dir) {
  char ws[512], file[600];
  snprintf(ws, sizeof ws, "%s/secrets", dir);
  mkdir(ws, 0700);
  snprintf(file, sizeof file, "%s/agent.yaml", ws);
  write_file(file, "secrets:\n  TOKEN: op://Dev/C/field\n  OTHER: op://Dev/Missing/field\n");
  moat_config *cfg = NULL;
  CHECK(moat_config_load(ws, &cfg, NULL) == MOAT_OK);
  char *json = NULL;
  moat_error *err = NULL;
  CHECK(moat_config_resolve_secrets_json(cfg, &json, &err) == MOAT_ERR_CONFIG);
  CHECK(json == NULL);
  CHECK(err && strstr(moat_error_message(err), "secret OTHER (1password)") != NULL);
  moat_error_free(err);
  moat_config_free(cfg);

  write_file(file, "secrets:\n  TOKEN: op://Dev/C/field\n");
  cfg = NULL;
  CHECK(moat_config_load(ws, &cfg, NULL) == MOAT_OK);
  CHECK(moat_config_resolve_secrets_json(cfg, &json, NULL) == MOAT_OK);
  CHECK(json && strcmp(json, "{\"TOKEN\":\"c-op-secret\"}") == 0);
  moat_string_free(json);
  moat_config_free(cfg);
}

/* MOAT_DEPS_REGISTRY that is not UTF-8 is an error wherever it would
   choose an image, never read as unset. */
static void test_bad_deps_registry(const char *dir) {
  char ws[512], file[600];
  snprintf(ws, sizeof ws, "%s/badreg", dir);
  mkdir(ws, 0700);
  snprintf(file, sizeof file, "%s/agent.yaml", ws);
  write_file(file, "dependencies: [node@20]\n");
  setenv("MOAT_DEPS_REGISTRY", "mirror\xff/library", 1);
  moat_config *cfg = NULL;
  moat_error *err = NULL;
  CHECK(moat_config_load(ws, &cfg, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(cfg == NULL);
  CHECK(err && strstr(moat_error_message(err), "MOAT_DEPS_REGISTRY is not UTF-8"));
  moat_error_free(err);
  char *json = NULL;
  err = NULL;
  CHECK(moat_deps_json(NULL, &json, &err) == MOAT_ERR_INVALID_ARGUMENT);
  CHECK(json == NULL);
  CHECK(err && strstr(moat_error_message(err), "MOAT_DEPS_REGISTRY is not UTF-8"));
  moat_error_free(err);
  unsetenv("MOAT_DEPS_REGISTRY");
  CHECK(moat_config_load(ws, &cfg, NULL) == MOAT_OK);
  CHECK(cfg && strcmp(moat_config_image(cfg), "node:20-bookworm") == 0);
  moat_config_free(cfg);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
    return 2;
  }
  test_sigpipe_ignored(argv[1]);
  test_version();
  test_valid(argv[1]);
  test_defaults(argv[1]);
  test_invalid(argv[1]);
  test_several_errors_with_their_parts(argv[1]);
  test_misuse();
  test_secrets(argv[1]);
  test_bad_deps_registry(argv[1]);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
