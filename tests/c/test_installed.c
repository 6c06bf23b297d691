/* libmoat as installed by scripts/install-lib.sh, built with pkg-config
 * (tests/c/installed.sh builds it shared and static): the version, a
 * configuration, and a run that leaves the `moat` program for the library
 * to find. Shared, libmoat finds PREFIX/bin/moat beside its own lib/
 * directory; static, the library is the program, so outside the prefix it
 * finds none and says so (the caller clears MOAT_SUPERVISOR and PATH's
 * `moat`).
 * Usage: test_installed SCRATCH_DIR IMAGE found|missing */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <moat.h>

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

static void test_version(void) {
  char want[64];
  snprintf(want, sizeof want, "%d.%d.%d", MOAT_VERSION_MAJOR, MOAT_VERSION_MINOR,
           MOAT_VERSION_PATCH);
  CHECK(strcmp(moat_version(), want) == 0);
}

static void test_config(const char *scratch) {
  char ws[512], file[600];
  snprintf(ws, sizeof ws, "%s/config", scratch);
  mkdir(ws, 0700);
  snprintf(file, sizeof file, "%s/agent.yaml", ws);
  FILE *f = fopen(file, "w");
  CHECK(f != NULL);
  if (!f) return;
  fputs("name: installed\nports:\n  web: 70000\n", f);
  fclose(f);
  moat_config *cfg = NULL;
  moat_error *err = NULL;
  CHECK(moat_config_load(ws, &cfg, &err) == MOAT_ERR_CONFIG);
  CHECK(cfg == NULL && moat_error_count(err) == 1);
  CHECK(moat_error_item_line(err, 0) == 3 && moat_error_item_column(err, 0) == 8);
  moat_error_free(err);

  f = fopen(file, "w");
  CHECK(f != NULL);
  if (!f) return;
  fputs("name: installed\nimage: example.test/installed:1\n", f);
  fclose(f);
  err = NULL;
  CHECK(moat_config_load(ws, &cfg, &err) == MOAT_OK);
  CHECK(cfg && strcmp(moat_config_name(cfg), "installed") == 0);
  CHECK(cfg && strcmp(moat_config_image(cfg), "example.test/installed:1") == 0);
  moat_config_free(cfg);
  moat_error_free(err);
}

static void test_run(const char *scratch, const char *image, int found) {
  char home[512], ws[512];
  snprintf(home, sizeof home, "%s/home", scratch);
  snprintf(ws, sizeof ws, "%s/ws", scratch);
  mkdir(home, 0700);
  mkdir(ws, 0700);
  const char *engine = getenv("MOAT_RUNTIME");
  moat_run_options *o = moat_run_options_new(ws);
  CHECK(o != NULL);
  if (!o) return;
  CHECK(moat_run_options_set(o, "home", home, NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "image", image, NULL) == MOAT_OK);
  CHECK(moat_run_options_set(o, "runtime", engine && *engine ? engine : "docker", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "sh", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "-c", NULL) == MOAT_OK);
  CHECK(moat_run_options_add(o, "arg", "exit 3", NULL) == MOAT_OK);
  moat_run *run = NULL;
  moat_error *err = NULL;
  moat_status st = moat_run_start(o, &run, &err);
  moat_run_options_free(o);
  if (!found) {
    CHECK(st == MOAT_ERR_RUNTIME && run == NULL);
    CHECK(err && strstr(moat_error_message(err), "cannot find the `moat` program"));
    moat_error_free(err);
    return;
  }
  CHECK(st == MOAT_OK);
  if (st != MOAT_OK) {
    fprintf(stderr, "moat_run_start: %s\n", err ? moat_error_message(err) : "?");
    moat_error_free(err);
    return;
  }
  bool done = false;
  int64_t code = 0;
  CHECK(moat_run_wait(run, 120000, &done, &code, NULL) == MOAT_OK);
  CHECK(done && code == 3);
  CHECK(moat_run_destroy(run, NULL) == MOAT_OK);
  moat_run_free(run);
}

int main(int argc, char **argv) {
  if (argc != 4 || (strcmp(argv[3], "found") != 0 && strcmp(argv[3], "missing") != 0)) {
    fprintf(stderr, "usage: %s SCRATCH_DIR IMAGE found|missing\n", argv[0]);
    return 2;
  }
  /* As docs/c-and-go.md asks of programs that use runs or the proxy. */
  signal(SIGPIPE, SIG_IGN);
  test_version();
  test_config(argv[1]);
  test_run(argv[1], argv[2], strcmp(argv[3], "found") == 0);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
