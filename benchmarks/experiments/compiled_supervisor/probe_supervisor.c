/* An experiment, not gpujobd code: the happy path of a compiled per-job supervisor, written only to
 * measure what replacing the forked Python supervisor would save in a burst (README.md here). It has
 * no log pump, no run loop, no stop-signal rules, no leftover count and a toy JSON reader: it must
 * never be installed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 20];
static char *argv_[4096]; static int argc_;
static char *envp_[4096]; static int envc_;
static long long job_id, uid, gid, umask_, max_runs;
static char *cwd, *user, *exit_record, *runs_file;
static char *p;

static void ws(void) { while (*p == ' ' || *p == '\n') p++; }
static char *str(void) {            /* p at '"'; decodes in place */
    char *out = ++p, *w = p;
    while (*p != '"') {
        if (*p == '\\') {
            p++;
            switch (*p) {
            case 'n': *w++ = '\n'; break; case 't': *w++ = '\t'; break; case 'r': *w++ = '\r'; break;
            case 'b': *w++ = '\b'; break; case 'f': *w++ = '\f'; break;
            case 'u': { unsigned v; sscanf(p + 1, "%4x", &v); p += 4; *w++ = (char)v; break; }
            default: *w++ = *p;
            }
            p++;
        } else *w++ = *p++;
    }
    p++; *w = 0; return out;
}
static long long num(void) { char *e; double d = strtod(p, &e); p = e; return (long long)d; }
static void skip_value(void) {
    ws();
    if (*p == '"') { str(); return; }
    if (*p == 't') { p += 4; return; } if (*p == 'f') { p += 5; return; } if (*p == 'n') { p += 4; return; }
    num();
}
static void parse(void) {
    p = buf; ws(); p++;                       /* { */
    for (;;) {
        ws(); if (*p == '}') break;
        char *key = str(); ws(); p++; ws();   /* : */
        if (!strcmp(key, "argv")) {
            p++; ws();
            while (*p != ']') { argv_[argc_++] = str(); ws(); if (*p == ',') p++; ws(); }
            p++;
        } else if (!strcmp(key, "env")) {
            p++; ws();
            while (*p != '}') {
                char *k = str(); ws(); p++; ws(); char *v = str();
                char *kv = malloc(strlen(k) + strlen(v) + 2); sprintf(kv, "%s=%s", k, v);
                envp_[envc_++] = kv; ws(); if (*p == ',') p++; ws();
            }
            p++;
        } else if (!strcmp(key, "job_id")) job_id = num();
        else if (!strcmp(key, "uid")) uid = num();
        else if (!strcmp(key, "gid")) gid = num();
        else if (!strcmp(key, "umask")) umask_ = num();
        else if (!strcmp(key, "max_runs")) max_runs = num();
        else if (!strcmp(key, "cwd")) cwd = str();
        else if (!strcmp(key, "user")) user = str();
        else if (!strcmp(key, "exit_record")) exit_record = str();
        else if (!strcmp(key, "runs_file")) runs_file = str();
        else skip_value();
        ws(); if (*p == ',') p++;
    }
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_REALTIME, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(void) {
    size_t n = 0; ssize_t r;
    while (!memchr(buf, '\n', n) && (r = read(0, buf + n, sizeof buf - 1 - n)) > 0) n += r;
    char *nl = memchr(buf, '\n', n); if (!nl) return 3;
    size_t spec_len = nl - buf + 1;
    char gate[16]; size_t g = n - spec_len; memcpy(gate, buf + spec_len, g < 16 ? g : 16);
    *nl = 0; parse();
    gid_t groups[256]; int ng = 256;
    if (getgrouplist(user, gid, groups, &ng) < 0) ng = 0;
    while (g < 8 && (r = read(0, gate + g, 8 - g)) > 0) g += r;
    if (g < 8 || memcmp(gate, "release\n", 8)) return 4;
    int devnull = open("/dev/null", O_RDONLY); dup2(devnull, 0); close(devnull);
    envp_[envc_++] = "GPUJOB_RUN=1"; envp_[envc_] = 0; argv_[argc_] = 0;
    double started = now();
    pid_t pid = fork();
    if (pid == 0) {
        if (setgroups(ng, groups) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid)) _exit(127);
        if (chdir(cwd)) _exit(127);
        umask(umask_);
        execvpe(argv_[0], argv_, envp_);
        _exit(127);
    }
    int status; waitpid(pid, &status, 0);
    double ended = now();
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    char line[1024];
    int len = snprintf(line, sizeof line, "{\"run\":1,\"started_at\":%.6f,\"ended_at\":%.6f,\"exit_code\":%d,"
                       "\"signal\":null,\"reason\":\"exit-code\",\"detail\":\"exited with code %d\"}\n",
                       started, ended, code, code);
    int fd = open(runs_file, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    write(fd, line, len); fsync(fd); close(fd);
    len = snprintf(line, sizeof line, "{\"job_id\":%lld,\"started_at\":%.6f,\"ended_at\":%.6f,\"exit_code\":%d,"
                   "\"signal\":null,\"reason\":\"exit-code\",\"detail\":\"exited with code %d\","
                   "\"leftover_processes\":0,\"runs\":1,\"max_runs\":%lld,\"terminated_by_signal\":null,"
                   "\"stop_signal_phase\":null,\"stop_signal_after_s\":null,\"log_bytes\":0,"
                   "\"log_truncated\":false,\"log_error\":null}\n", job_id, started, now(), code, code, max_runs);
    char tmp[4096]; snprintf(tmp, sizeof tmp, "%s.%d.tmp", exit_record, getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    write(fd, line, len); fsync(fd); close(fd); rename(tmp, exit_record);
    return 0;
}
