/*
 * gpujob-supervisor: the small root program that runs inside each job's scope and runs the job's
 * command in it. The compiled twin of gpujobd/supervisor.py's supervise(), with the same contract:
 *
 *   fd 0   the gate: one JSON line (the job spec, supervisor.encode_spec), then "release\n" once
 *          the scope is active; EOF or any other line before that runs nothing
 *   fd 1,2 the job's log, opened by the daemon
 *
 * It looks up the user's groups and sets up the log pump behind the closed gate, runs the command up
 * to max_runs times as the job's user (never as root), appends one JSON line per finished run to
 * runs_file, and writes the exit record atomically to exit_record. Its own exit status is not the
 * job's: 0 means the record was written (see EXIT_* below).
 *
 * Why C: a forked Python supervisor cost a job more CPU than everything systemd and the bus do for
 * it (docs/design.md, "Why a zygote"; benchmarks/experiments/compiled_supervisor).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { EXIT_RECORDED = 0, EXIT_RECORD_FAILED = 1, EXIT_USAGE = 2, EXIT_NO_SPEC = 3 };
enum { CHILD_FAILED_STATUS = 127 };

#define LOG_PREFIX "gpujob: "
#define RELEASE_LINE "release\n"
#define RUN_ENV_VAR "GPUJOB_RUN"
#define DEFAULT_CGROUP_ROOT "/sys/fs/cgroup"
#define DEFAULT_PATH "/bin:/usr/bin" /* Python's os.defpath: a job env without PATH */
#define LEFTOVERS_UNAVAILABLE "leftover count unavailable"
#define SPEC_MAX_BYTES (64u << 20)
#define LOG_PUMP_CHUNK 65536
#define MAX_DELAY_S (100.0 * 365 * 24 * 3600)
#define MAX_LOG_DRAIN_S 3600.0

static const int STOP_SIGNALS[] = {SIGTERM, SIGINT, SIGHUP};

/* ------------------------------------------------------------------------------------------------
 * Small helpers: text that grows, and the log (fd 2), which must never fail the supervisor. */

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static void buf_reserve(Buf *b, size_t more) {
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data)
        abort(); /* out of memory in a root program: nothing sane is left to do */
    if (!b->data)
        data[0] = '\0'; /* an empty text is a text too */
    b->data = data;
    b->cap = cap;
}

static void buf_add(Buf *b, const char *s, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void buf_printf(Buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count, size);
    if (!p)
        abort(); /* out of memory in a root program: nothing sane is left to do */
    return p;
}

static char *xstrdup(const char *s) {
    char *copy = strdup(s);
    if (!copy)
        abort();
    return copy;
}

static int write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static void log_line(const char *fmt, ...) {
    Buf b = {0};
    buf_add(&b, LOG_PREFIX, strlen(LOG_PREFIX));
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n >= 0) {
        buf_reserve(&b, (size_t)n);
        va_start(ap, fmt);
        vsnprintf(b.data + b.len, (size_t)n + 1, fmt, ap);
        va_end(ap);
        b.len += (size_t)n;
    }
    buf_add(&b, "\n", 1);
    int saved = errno;
    (void)write_all(2, b.data, b.len);
    errno = saved;
    free(b.data);
}

static const char *signal_name(int signum, char *out, size_t size) {
    /* As Python's signal.Signals(n).name, which tests and the daemon's texts use. */
    if (signum == 0) {
        snprintf(out, size, "a stop signal");
        return out;
    }
    if (signum == SIGRTMIN) {
        snprintf(out, size, "SIGRTMIN");
        return out;
    }
    if (signum == SIGRTMAX) {
        snprintf(out, size, "SIGRTMAX");
        return out;
    }
    const char *abbrev = signum < SIGRTMIN ? sigabbrev_np(signum) : NULL;
    if (abbrev && strcmp(abbrev, "POLL") == 0)
        abbrev = "IO";
    if (abbrev && strcmp(abbrev, "IOT") == 0)
        abbrev = "ABRT";
    if (abbrev && strcmp(abbrev, "CLD") == 0)
        abbrev = "CHLD";
    if (abbrev)
        snprintf(out, size, "SIG%s", abbrev);
    else
        snprintf(out, size, "signal %d", signum);
    return out;
}

/* ------------------------------------------------------------------------------------------------
 * JSON in: the spec, as the daemon writes it (json.dumps, ASCII). A strict reader of one object. */

typedef enum { J_NULL, J_BOOL, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT } JKind;

typedef struct JValue JValue;
struct JValue {
    JKind kind;
    bool boolean;
    bool integral;        /* a number written without fraction or exponent */
    long long integer;    /* when integral and it fits */
    bool integer_fits;
    double number;
    char *string;         /* bytes, NUL-terminated; has_nul says one is inside */
    size_t string_len;
    bool has_nul;
    JValue *items;        /* array items, or object values */
    char **keys;          /* object keys */
    size_t count;
};

typedef struct {
    const char *p, *end;
    char error[160];
} JReader;

static void j_fail(JReader *r, const char *what) {
    if (!r->error[0])
        snprintf(r->error, sizeof r->error, "%s", what);
}

static void j_space(JReader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static bool j_hex4(JReader *r, unsigned *out) {
    if (r->end - r->p < 4)
        return false;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = r->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return false;
    }
    r->p += 4;
    *out = v;
    return true;
}

static void utf8_put(Buf *b, unsigned cp) {
    char s[4];
    size_t n;
    if (cp < 0x80) {
        s[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        s[0] = (char)(0xC0 | (cp >> 6));
        s[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        s[0] = (char)(0xE0 | (cp >> 12));
        s[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        s[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        s[0] = (char)(0xF0 | (cp >> 18));
        s[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        s[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        s[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_add(b, s, n);
}

/* The length of the valid UTF-8 sequence at p (a lead byte >= 0x80), or 0: no overlong forms, no
 * surrogates, nothing past U+10FFFF, as Python's UTF-8 decoder. */
static size_t utf8_sequence_length(const unsigned char *p, size_t available) {
    unsigned char c = p[0];
    size_t n = c >= 0xF0 && c < 0xF5 ? 4 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
    if (n == 0 || n > available)
        return 0;
    for (size_t i = 1; i < n; i++)
        if ((p[i] & 0xC0) != 0x80)
            return 0;
    if (n == 3) {
        unsigned cp = ((c & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
        if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
    } else if (n == 4) {
        unsigned cp = ((c & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
        if (cp < 0x10000 || cp > 0x10FFFF)
            return 0;
    }
    return n;
}

static bool j_string(JReader *r, JValue *v) {
    Buf b = {0};
    buf_reserve(&b, 0);
    r->p++; /* the opening quote */
    bool has_nul = false;
    while (r->p < r->end && *r->p != '"') {
        unsigned char c = (unsigned char)*r->p;
        if (c < 0x20) {
            j_fail(r, "a control character in a string");
            free(b.data);
            return false;
        }
        if (c >= 0x80) {
            size_t n = utf8_sequence_length((const unsigned char *)r->p, (size_t)(r->end - r->p));
            if (n == 0) {
                j_fail(r, "bytes that are not UTF-8");
                free(b.data);
                return false;
            }
            buf_add(&b, r->p, n);
            r->p += n;
            continue;
        }
        if (c != '\\') {
            buf_add(&b, r->p, 1);
            r->p++;
            continue;
        }
        r->p++;
        if (r->p >= r->end)
            break;
        char e = *r->p++;
        switch (e) {
        case '"': buf_add(&b, "\"", 1); break;
        case '\\': buf_add(&b, "\\", 1); break;
        case '/': buf_add(&b, "/", 1); break;
        case 'b': buf_add(&b, "\b", 1); break;
        case 'f': buf_add(&b, "\f", 1); break;
        case 'n': buf_add(&b, "\n", 1); break;
        case 'r': buf_add(&b, "\r", 1); break;
        case 't': buf_add(&b, "\t", 1); break;
        case 'u': {
            unsigned cp;
            if (!j_hex4(r, &cp)) {
                j_fail(r, "a bad \\u escape");
                free(b.data);
                return false;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF && r->end - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u') {
                const char *save = r->p;
                unsigned low;
                r->p += 2;
                if (j_hex4(r, &low) && low >= 0xDC00 && low <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                } else {
                    r->p = save;
                }
            }
            if (cp >= 0xDC80 && cp <= 0xDCFF) {
                /* A lone low surrogate of Python's surrogateescape: the byte it stands for, as
                 * os.fsencode gives it (an argument or path that is not UTF-8). */
                char byte = (char)(cp - 0xDC00);
                buf_add(&b, &byte, 1);
            } else if (cp >= 0xD800 && cp <= 0xDFFF) {
                j_fail(r, "a lone surrogate in a string");
                free(b.data);
                return false;
            } else {
                if (cp == 0)
                    has_nul = true;
                utf8_put(&b, cp);
            }
            break;
        }
        default:
            j_fail(r, "a bad escape");
            free(b.data);
            return false;
        }
    }
    if (r->p >= r->end) {
        j_fail(r, "an unterminated string");
        free(b.data);
        return false;
    }
    r->p++; /* the closing quote */
    v->kind = J_STRING;
    v->string = b.data;
    v->string_len = b.len;
    v->has_nul = has_nul;
    return true;
}

static bool j_value(JReader *r, JValue *v, int depth);

static bool j_digits(JReader *r) {
    const char *start = r->p;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
        r->p++;
    return r->p > start;
}

/* JSON's grammar exactly: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? (no leading zeros). */
static bool j_number(JReader *r, JValue *v) {
    const char *start = r->p;
    if (r->p < r->end && *r->p == '-')
        r->p++;
    if (r->p < r->end && *r->p == '0')
        r->p++;
    else if (!(r->p < r->end && *r->p >= '1' && *r->p <= '9' && j_digits(r))) {
        j_fail(r, "a bad number");
        return false;
    }
    bool integral = true;
    if (r->p < r->end && *r->p == '.') {
        r->p++;
        integral = false;
        if (!j_digits(r)) {
            j_fail(r, "a bad number");
            return false;
        }
    }
    if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
        r->p++;
        integral = false;
        if (r->p < r->end && (*r->p == '+' || *r->p == '-'))
            r->p++;
        if (!j_digits(r)) {
            j_fail(r, "a bad number");
            return false;
        }
    }
    char text[64];
    size_t len = (size_t)(r->p - start);
    if (len >= sizeof text) {
        j_fail(r, "a number too long");
        return false;
    }
    memcpy(text, start, len);
    text[len] = '\0';
    char *stop;
    errno = 0;
    v->kind = J_NUMBER;
    v->integral = integral;
    v->number = strtod(text, &stop);
    if (*stop) {
        j_fail(r, "a bad number");
        return false;
    }
    if (integral) {
        errno = 0;
        v->integer = strtoll(text, &stop, 10);
        v->integer_fits = errno == 0 && !*stop;
    }
    return true;
}

static bool j_literal(JReader *r, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0)
        return false;
    r->p += n;
    return true;
}

static bool j_container(JReader *r, JValue *v, bool object, int depth) {
    char close = object ? '}' : ']';
    r->p++;
    v->kind = object ? J_OBJECT : J_ARRAY;
    size_t cap = 0;
    j_space(r);
    if (r->p < r->end && *r->p == close) {
        r->p++;
        return true;
    }
    for (;;) {
        if (v->count == cap) {
            cap = cap ? cap * 2 : 8;
            v->items = realloc(v->items, cap * sizeof *v->items);
            if (object)
                v->keys = realloc(v->keys, cap * sizeof *v->keys);
            if (!v->items || (object && !v->keys))
                abort();
        }
        JValue *item = &v->items[v->count];
        memset(item, 0, sizeof *item);
        j_space(r);
        if (object) {
            JValue key = {0};
            if (r->p >= r->end || *r->p != '"' || !j_string(r, &key)) {
                j_fail(r, "an object key that is not a string");
                return false;
            }
            v->keys[v->count] = key.string;
            j_space(r);
            if (r->p >= r->end || *r->p != ':') {
                j_fail(r, "a missing ':'");
                return false;
            }
            r->p++;
        }
        if (!j_value(r, item, depth + 1))
            return false;
        v->count++;
        j_space(r);
        if (r->p < r->end && *r->p == ',') {
            r->p++;
            continue;
        }
        if (r->p < r->end && *r->p == close) {
            r->p++;
            return true;
        }
        j_fail(r, object ? "a missing ',' or '}'" : "a missing ',' or ']'");
        return false;
    }
}

static bool j_value(JReader *r, JValue *v, int depth) {
    if (depth > 8) {
        j_fail(r, "values nested too deep");
        return false;
    }
    j_space(r);
    if (r->p >= r->end) {
        j_fail(r, "an unexpected end");
        return false;
    }
    switch (*r->p) {
    case '"': return j_string(r, v);
    case '{': return j_container(r, v, true, depth);
    case '[': return j_container(r, v, false, depth);
    case 't':
        if (j_literal(r, "true")) { v->kind = J_BOOL; v->boolean = true; return true; }
        break;
    case 'f':
        if (j_literal(r, "false")) { v->kind = J_BOOL; v->boolean = false; return true; }
        break;
    case 'n':
        if (j_literal(r, "null")) { v->kind = J_NULL; return true; }
        break;
    default:
        return j_number(r, v);
    }
    j_fail(r, "an unknown literal");
    return false;
}

/* ------------------------------------------------------------------------------------------------
 * The spec: every key of supervisor.SPEC_KEYS, checked as spec_from_dict checks it. */

static const char *const SPEC_KEYS[] = {
    "job_id", "argv", "cwd", "env", "uid", "gid", "user", "umask", "exit_record", "runs_file",
    "max_runs", "restart_delay_s", "stop_on_failure", "log_max_bytes", "log_drain_s",
};
#define SPEC_KEY_COUNT (sizeof SPEC_KEYS / sizeof SPEC_KEYS[0])

typedef struct {
    long long job_id, uid, gid, umask, max_runs, log_max_bytes;
    char **argv;
    size_t argc;
    char **env; /* NAME=VALUE, NULL-terminated, with room for GPUJOB_RUN */
    size_t envc;
    char *path_variable; /* the env's PATH, or NULL */
    char *cwd, *user, *exit_record, *runs_file;
    double restart_delay_s, log_drain_s;
    bool stop_on_failure;
} Spec;

static const JValue *spec_field(const JValue *obj, const char *key) {
    for (size_t i = obj->count; i-- > 0;) /* a repeated key: the last one counts, as in json.loads */
        if (strcmp(obj->keys[i], key) == 0)
            return &obj->items[i];
    return NULL;
}

/* A string with no NUL in it (one could hide behind a \u0000 escape). */
static bool text_without_nul(const JValue *v) {
    return v->kind == J_STRING && !v->has_nul && strlen(v->string) == v->string_len;
}

static bool clean_text(const JValue *v) {
    return text_without_nul(v) && v->string_len > 0;
}

static bool check_int(const JValue *v, long long low, long long high, bool bounded, long long *out) {
    if (v->kind != J_NUMBER || !v->integral || !v->integer_fits || v->integer < low ||
        (bounded && v->integer > high))
        return false;
    *out = v->integer;
    return true;
}

static bool check_seconds(const JValue *v, double high, double *out) {
    if (v->kind != J_NUMBER || !(v->number >= 0 && v->number <= high))
        return false;
    *out = v->number;
    return true;
}

/* Fills `spec` from the parsed object; on a problem writes the same sentence spec_from_dict would. */
static bool spec_from_object(const JValue *obj, Spec *spec, char *why, size_t size) {
    if (obj->kind != J_OBJECT) {
        snprintf(why, size, "job spec is not a JSON object");
        return false;
    }
    Buf missing = {0}, unknown = {0};
    buf_add(&missing, "[", 1);
    buf_add(&unknown, "[", 1);
    bool bad_keys = false;
    for (size_t k = 0; k < SPEC_KEY_COUNT; k++)
        if (!spec_field(obj, SPEC_KEYS[k])) {
            buf_printf(&missing, "%s'%s'", bad_keys && missing.len > 1 ? ", " : "", SPEC_KEYS[k]);
            bad_keys = true;
        }
    bool any_unknown = false;
    for (size_t i = 0; i < obj->count; i++) {
        bool known = false;
        for (size_t k = 0; k < SPEC_KEY_COUNT; k++)
            known |= strcmp(obj->keys[i], SPEC_KEYS[k]) == 0;
        if (!known) {
            buf_printf(&unknown, "%s'%s'", any_unknown ? ", " : "", obj->keys[i]);
            any_unknown = true;
        }
    }
    buf_add(&missing, "]", 1);
    buf_add(&unknown, "]", 1);
    if (bad_keys || any_unknown) {
        snprintf(why, size, "job spec: missing keys %s, unknown keys %s", missing.data, unknown.data);
        free(missing.data);
        free(unknown.data);
        return false;
    }
    free(missing.data);
    free(unknown.data);

    struct { const char *key; long long low, high; bool bounded; long long *out; } ints[] = {
        {"job_id", 0, 0, false, &spec->job_id},
        {"uid", 1, 0, false, &spec->uid}, /* uid 0 is refused: user code never runs as root */
        {"gid", 0, 0, false, &spec->gid},
        {"umask", 0, 0777, true, &spec->umask},
        {"max_runs", 1, 0, false, &spec->max_runs},
        {"log_max_bytes", 0, 0, false, &spec->log_max_bytes},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (!check_int(spec_field(obj, ints[i].key), ints[i].low, ints[i].high, ints[i].bounded,
                       ints[i].out)) {
            if (ints[i].bounded)
                snprintf(why, size, "job spec: %s must be an integer in %lld..%lld", ints[i].key,
                         ints[i].low, ints[i].high);
            else
                snprintf(why, size, "job spec: %s must be an integer >= %lld", ints[i].key, ints[i].low);
            return false;
        }
    if (spec->uid > (long long)UINT_MAX - 1 || spec->gid > (long long)UINT_MAX - 1) {
        snprintf(why, size, "job spec: uid and gid must be valid ids");
        return false;
    }

    const JValue *argv = spec_field(obj, "argv");
    if (argv->kind != J_ARRAY || argv->count == 0 || !clean_text(&argv->items[0])) {
        snprintf(why, size, "job spec: argv must be a non-empty list starting with the command");
        return false;
    }
    spec->argv = xcalloc(argv->count + 1, sizeof *spec->argv);
    for (size_t i = 0; i < argv->count; i++) {
        const JValue *arg = &argv->items[i];
        if (!text_without_nul(arg)) {
            snprintf(why, size, "job spec: argv must hold strings without NUL");
            return false;
        }
        spec->argv[i] = arg->string;
    }
    spec->argc = argv->count;

    const JValue *env = spec_field(obj, "env");
    if (env->kind != J_OBJECT) {
        snprintf(why, size, "job spec: env must be an object");
        return false;
    }
    spec->env = xcalloc(env->count + 2, sizeof *spec->env);
    for (size_t i = 0; i < env->count; i++) {
        const char *name = env->keys[i];
        const JValue *value = &env->items[i];
        if (!*name || strchr(name, '=') || !text_without_nul(value)) {
            snprintf(why, size, "job spec: bad environment variable '%s'", name);
            return false;
        }
        if (strcmp(name, RUN_ENV_VAR) == 0)
            continue; /* set per run below, as env[RUN_ENV_VAR] = str(run) replaces it */
        Buf pair = {0};
        buf_printf(&pair, "%s=%s", name, value->string);
        spec->env[spec->envc++] = pair.data;
        if (strcmp(name, "PATH") == 0)
            spec->path_variable = value->string;
    }

    struct { const char *key; char **out; bool absolute; } texts[] = {
        {"user", &spec->user, false},
        {"cwd", &spec->cwd, true},
        {"exit_record", &spec->exit_record, true},
        {"runs_file", &spec->runs_file, true},
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        const JValue *v = spec_field(obj, texts[i].key);
        if (!clean_text(v)) {
            snprintf(why, size, "job spec: %s must be a non-empty string without NUL", texts[i].key);
            return false;
        }
        if (texts[i].absolute && v->string[0] != '/') {
            snprintf(why, size, "job spec: %s must be an absolute path", texts[i].key);
            return false;
        }
        *texts[i].out = v->string;
    }
    if (!check_seconds(spec_field(obj, "restart_delay_s"), MAX_DELAY_S, &spec->restart_delay_s)) {
        snprintf(why, size, "job spec: restart_delay_s must be a number from 0 to %.0f", MAX_DELAY_S);
        return false;
    }
    if (!check_seconds(spec_field(obj, "log_drain_s"), MAX_LOG_DRAIN_S, &spec->log_drain_s)) {
        snprintf(why, size, "job spec: log_drain_s must be a number from 0 to %.0f", MAX_LOG_DRAIN_S);
        return false;
    }
    const JValue *stop = spec_field(obj, "stop_on_failure");
    if (stop->kind != J_BOOL) {
        snprintf(why, size, "job spec: stop_on_failure must be a boolean");
        return false;
    }
    spec->stop_on_failure = stop->boolean;
    return true;
}

static bool parse_spec(const char *line, size_t len, Spec *spec, char *why, size_t size) {
    JReader r = {.p = line, .end = line + len};
    JValue root = {0};
    if (!j_value(&r, &root, 0)) {
        snprintf(why, size, "job spec is not JSON: %s", r.error);
        return false;
    }
    j_space(&r);
    if (r.p != r.end) {
        snprintf(why, size, "job spec is not JSON: extra data after the value");
        return false;
    }
    return spec_from_object(&root, spec, why, size); /* the parsed values stay: the spec points in */
}

/* ------------------------------------------------------------------------------------------------
 * JSON out: the run lines and the exit record. Valid UTF-8 goes through; any other byte is written
 * as Python's surrogateescape would have it, so the daemon's json.loads always reads the record. */

static void json_string(Buf *b, const char *s) {
    buf_add(b, "\"", 1);
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned char c = *p;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            buf_add(b, esc, 2);
            p++;
        } else if (c == '\n') {
            buf_add(b, "\\n", 2);
            p++;
        } else if (c == '\t') {
            buf_add(b, "\\t", 2);
            p++;
        } else if (c == '\r') {
            buf_add(b, "\\r", 2);
            p++;
        } else if (c < 0x20 || c == 0x7F) {
            buf_printf(b, "\\u%04x", c);
            p++;
        } else if (c < 0x80) {
            buf_add(b, (const char *)p, 1);
            p++;
        } else {
            size_t n = utf8_sequence_length(p, strlen((const char *)p));
            bool valid = n > 0;
            if (valid) {
                buf_add(b, (const char *)p, n);
                p += n;
            } else {
                buf_printf(b, "\\udc%02x", c);
                p++;
            }
        }
    }
    buf_add(b, "\"", 1);
}

static void json_key(Buf *b, const char *key, bool first) {
    if (!first)
        buf_add(b, ",", 1);
    json_string(b, key);
    buf_add(b, ":", 1);
}

static void json_optional_int(Buf *b, bool present, long long value) {
    if (present)
        buf_printf(b, "%lld", value);
    else
        buf_add(b, "null", 4);
}

static void json_optional_time(Buf *b, bool present, double value) {
    if (present)
        buf_printf(b, "%.6f", value);
    else
        buf_add(b, "null", 4);
}

/* ------------------------------------------------------------------------------------------------
 * Runs and records. */

typedef enum { REASON_EXIT_CODE, REASON_SIGNAL, REASON_EXEC_FAILED, REASON_CHDIR_FAILED,
               REASON_SETUP_FAILED, REASON_LOST } Reason;

static const char *const REASON_TEXT[] = {"exit-code", "signal", "exec-failed", "chdir-failed",
                                          "setup-failed", "lost"};

typedef struct {
    long long run;
    double started_at, ended_at;
    bool has_exit_code, has_signal;
    int exit_code, signal;
    Reason reason;
    char *detail;
} Run;

static double wall_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static Run run_from_status(long long number, double started_at, double ended_at, int status) {
    Run run = {.run = number, .started_at = started_at, .ended_at = ended_at};
    Buf detail = {0};
    char name[32];
    if (WIFEXITED(status)) {
        run.has_exit_code = true;
        run.exit_code = WEXITSTATUS(status);
        run.reason = REASON_EXIT_CODE;
        buf_printf(&detail, "exited with code %d", run.exit_code);
    } else if (WIFSIGNALED(status)) {
        run.has_signal = true;
        run.signal = WTERMSIG(status);
        run.reason = REASON_SIGNAL;
        buf_printf(&detail, "killed by %s", signal_name(run.signal, name, sizeof name));
        if (WCOREDUMP(status))
            buf_printf(&detail, " (core dumped)");
    } else {
        run.reason = REASON_LOST;
        buf_printf(&detail, "unexpected wait status %#x", (unsigned)status);
    }
    run.detail = detail.data;
    return run;
}

static Run run_from_failure(long long number, double started_at, double ended_at, Reason reason,
                            const char *message) {
    Run run = {.run = number, .started_at = started_at, .ended_at = ended_at, .reason = reason};
    run.detail = xstrdup(message);
    return run;
}

static void encode_run(Buf *b, const Run *run) {
    buf_add(b, "{", 1);
    json_key(b, "run", true);
    buf_printf(b, "%lld", run->run);
    json_key(b, "started_at", false);
    json_optional_time(b, true, run->started_at);
    json_key(b, "ended_at", false);
    json_optional_time(b, true, run->ended_at);
    json_key(b, "exit_code", false);
    json_optional_int(b, run->has_exit_code, run->exit_code);
    json_key(b, "signal", false);
    json_optional_int(b, run->has_signal, run->signal);
    json_key(b, "reason", false);
    json_string(b, REASON_TEXT[run->reason]);
    json_key(b, "detail", false);
    json_string(b, run->detail);
    buf_add(b, "}\n", 2);
}

static bool cannot_rerun(Reason reason) {
    /* the same setup, chdir or exec would fail again */
    return reason == REASON_EXEC_FAILED || reason == REASON_CHDIR_FAILED ||
           reason == REASON_SETUP_FAILED || reason == REASON_LOST;
}

static bool should_run_again(const Run *last, long long done, const Spec *spec, int received) {
    if (received || done >= spec->max_runs)
        return false;
    if (cannot_rerun(last->reason))
        return false;
    bool succeeded = last->reason == REASON_EXIT_CODE && last->exit_code == 0;
    return succeeded || !spec->stop_on_failure;
}

static int fsync_directory_of(const char *path) {
    char *copy = xstrdup(path);
    char *slash = strrchr(copy, '/');
    if (slash == copy)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    int fd = open(slash ? copy : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(copy);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* Replace `path` with `data`: temp file in the same directory, fsync, rename, fsync the directory. */
static int write_atomic(const char *path, const char *data, size_t len) {
    const char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path) : 0;
    unsigned char random_bytes[4] = {0};
    if (getrandom(random_bytes, sizeof random_bytes, GRND_NONBLOCK) != sizeof random_bytes) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        memcpy(random_bytes, &t.tv_nsec, sizeof random_bytes);
    }
    Buf tmp = {0};
    buf_add(&tmp, path, dir_len);
    buf_printf(&tmp, "%s.%s.%d.%02x%02x%02x%02x.tmp", slash ? "/" : "", slash ? slash + 1 : path,
               (int)getpid(), random_bytes[0], random_bytes[1], random_bytes[2], random_bytes[3]);
    int fd = open(tmp.data, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        free(tmp.data);
        return -1;
    }
    int rc = write_all(fd, data, len) == 0 && fsync(fd) == 0 ? 0 : -1;
    int saved = errno;
    close(fd);
    if (rc == 0 && rename(tmp.data, path) != 0) {
        rc = -1;
        saved = errno;
    }
    if (rc != 0) {
        unlink(tmp.data);
        free(tmp.data);
        errno = saved;
        return -1;
    }
    free(tmp.data);
    return fsync_directory_of(path);
}

static int append_run(const char *path, const Run *run) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    Buf line = {0};
    encode_run(&line, run);
    int rc = write_all(fd, line.data, line.len) == 0 && fsync(fd) == 0 ? 0 : -1;
    int saved = errno;
    free(line.data);
    close(fd);
    errno = saved;
    return rc;
}

/* Processes in our own cgroup other than ourselves; -1 if they cannot be counted. */
static long own_leftover_processes(const char *cgroup_root) {
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (!f)
        return -1;
    char *line = NULL, *path = NULL;
    size_t size = 0;
    while (getline(&line, &size, f) > 0) {
        if (strncmp(line, "0::", 3) == 0) {
            line[strcspn(line, "\n")] = '\0';
            path = xstrdup(line + 3);
            break;
        }
    }
    free(line);
    fclose(f);
    if (!path)
        return -1;
    Buf procs = {0};
    buf_printf(&procs, "%s/%s/cgroup.procs", cgroup_root, path + strspn(path, "/"));
    free(path);
    f = fopen(procs.data, "re");
    free(procs.data);
    if (!f)
        return -1;
    long count = 0, pid;
    pid_t own = getpid();
    int scanned;
    while ((scanned = fscanf(f, "%ld", &pid)) == 1)
        if (pid != own)
            count++;
    bool clean = scanned == EOF && !ferror(f);
    fclose(f);
    return clean ? count : -1;
}

/* ------------------------------------------------------------------------------------------------
 * The log pump: the job writes into a pipe; a thread copies it to the log file, up to the cap
 * (0: none). Past the cap one line says so and the rest is read and dropped, so the job runs on; a
 * write that fails (ENOSPC, EIO) is remembered for the exit record (issue 15). */

typedef struct {
    long long cap;
    _Atomic long long written; /* the pump thread writes these; the main thread reads them at the end, */
    atomic_bool truncated;     /* even when that thread is stuck in a write past log_drain_s: no lock */
    atomic_bool failed;        /* set once `error` holds the text */
    char error[128];
    int log_fd, read_fd;
    pthread_t thread;
    bool started;
} Pump;

static Pump pump;

static void pump_fail(int error) {
    snprintf(pump.error, sizeof pump.error, "%s", strerror(error));
    atomic_store_explicit(&pump.failed, true, memory_order_release);
}

static void pump_keep(const char *data, size_t len) {
    if (atomic_load(&pump.truncated) || atomic_load(&pump.failed))
        return;
    long long written = atomic_load(&pump.written);
    bool truncating = pump.cap && written + (long long)len > pump.cap;
    if (truncating)
        len = (size_t)(pump.cap - written);
    if (write_all(pump.log_fd, data, len) != 0) {
        pump_fail(errno);
        return;
    }
    atomic_store(&pump.written, written + (long long)len);
    if (!truncating)
        return;
    atomic_store(&pump.truncated, true);
    Buf note = {0};
    buf_printf(&note, "\n" LOG_PREFIX "log truncated at %lld bytes (jobs.log_max_bytes); the job runs on, "
                      "its further output is dropped\n", pump.cap);
    if (write_all(pump.log_fd, note.data, note.len) != 0)
        pump_fail(errno);
    free(note.data);
}

static void *pump_copy(void *unused) {
    (void)unused;
    static char chunk[LOG_PUMP_CHUNK];
    for (;;) {
        ssize_t n = read(pump.read_fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return NULL;
        pump_keep(chunk, (size_t)n);
    }
}

/* Moves the log to a high fd the job never inherits; fds 1 and 2 become the pipe. */
static int pump_start(long long cap) {
    pump.cap = cap;
    pump.log_fd = fcntl(1, F_DUPFD_CLOEXEC, 3);
    int ends[2];
    if (pump.log_fd < 0 || pipe2(ends, O_CLOEXEC) != 0)
        return -1;
    pump.read_fd = ends[0];
    if (dup2(ends[1], 1) < 0 || dup2(ends[1], 2) < 0)
        return -1;
    close(ends[1]);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* the thread takes no signal: they are the main's */
    int rc = pthread_create(&pump.thread, NULL, pump_copy, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    pump.started = true;
    return 0;
}

/* Stop feeding the pipe ourselves, let the pump copy what is left (a leftover process may hold the
 * pipe open: never wait on it longer than drain_s); our own last words go to the log directly. */
static void pump_finish(double drain_s) {
    if (!pump.started)
        return;
    dup2(pump.log_fd, 1);
    dup2(pump.log_fd, 2);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    double whole;
    double fraction = modf(drain_s, &whole);
    deadline.tv_sec += (time_t)whole;
    deadline.tv_nsec += (long)(fraction * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    if (pthread_timedjoin_np(pump.thread, NULL, &deadline) == 0)
        pump.started = false;
}

static void encode_log_fate(Buf *b) {
    json_key(b, "log_bytes", false);
    buf_printf(b, "%lld", atomic_load(&pump.written));
    bool truncated = atomic_load(&pump.truncated);
    json_key(b, "log_truncated", false);
    buf_add(b, truncated ? "true" : "false", truncated ? 4 : 5);
    json_key(b, "log_error", false);
    if (atomic_load_explicit(&pump.failed, memory_order_acquire))
        json_string(b, pump.error);
    else
        buf_add(b, "null", 4);
}

/* ------------------------------------------------------------------------------------------------
 * Signals: the first stop signal is remembered (which, at what age, whether a run was in progress)
 * and every one is forwarded to the running child. They are blocked except where we wait. */

static volatile sig_atomic_t received;          /* the first stop signal, 0 if none */
static volatile sig_atomic_t received_during_run;
static volatile sig_atomic_t child_pid;         /* the running command, 0 if none */
static volatile sig_atomic_t released;
static struct timespec received_at;             /* CLOCK_BOOTTIME when it came */
static double started_boottime = -1;            /* ours, from /proc/self/stat */

static void on_stop_signal(int signum) {
    int saved = errno;
    if (!received) {
        clock_gettime(CLOCK_BOOTTIME, &received_at);
        received_during_run = child_pid != 0;
        received = signum;
    }
    if (released && child_pid > 0)
        kill((pid_t)child_pid, signum);
    errno = saved;
}

static void stop_signals_set(sigset_t *set) {
    sigemptyset(set);
    for (size_t i = 0; i < sizeof STOP_SIGNALS / sizeof STOP_SIGNALS[0]; i++)
        sigaddset(set, STOP_SIGNALS[i]);
}

static void block_stop_signals(void) {
    sigset_t set;
    stop_signals_set(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
}

static void unblock_stop_signals(void) {
    sigset_t set;
    stop_signals_set(&set);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
}

/* Let a stop signal that is pending in now: its handler notes it. */
static void take_pending_stop_signals(void) {
    unblock_stop_signals();
    block_stop_signals();
}

static void install_signals(void) {
    struct sigaction action = {0};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof STOP_SIGNALS / sizeof STOP_SIGNALS[0]; i++)
        sigaction(STOP_SIGNALS[i], &action, NULL);
    /* An inherited SIG_IGN for SIGCHLD would make the kernel reap the child before waitpid does. */
    signal(SIGCHLD, SIG_DFL);
}

/* Our start on CLOCK_BOOTTIME, rounded down to a clock tick: an age from it never under-counts, and
 * a stop signal RuntimeMaxSec=T sends always comes at an age of T or more (outcome.timed_out). */
static void read_own_start(void) {
    FILE *f = fopen("/proc/self/stat", "re");
    if (!f)
        return;
    char text[1024];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    char *after = strrchr(text, ')');
    if (!after)
        return;
    unsigned long long start_ticks = 0;
    char *field = after + 2;
    for (int i = 0; i < 19 && field; i++) { /* field 22 of stat: the 20th after the name */
        field = strchr(field, ' ');
        if (field)
            field++;
    }
    if (!field || sscanf(field, "%llu", &start_ticks) != 1)
        return;
    long ticks = sysconf(_SC_CLK_TCK);
    if (ticks > 0)
        started_boottime = (double)start_ticks / (double)ticks;
}

static bool received_after_s(double *age) {
    if (!received || started_boottime < 0)
        return false;
    double at = (double)received_at.tv_sec + (double)received_at.tv_nsec / 1e9;
    *age = round((at - started_boottime) * 1e6) / 1e6;
    return true;
}

/* Sleep between runs; a stop signal ends the sleep. */
static void pause_between_runs(double delay_s) {
    if (delay_s <= 0 || received)
        return;
    sigset_t set;
    stop_signals_set(&set);
    block_stop_signals();
    struct timespec timeout = {.tv_sec = (time_t)delay_s,
                               .tv_nsec = (long)((delay_s - (double)(time_t)delay_s) * 1e9)};
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += timeout.tv_sec;
    end.tv_nsec += timeout.tv_nsec;
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000L;
    }
    while (!received) {
        siginfo_t info;
        int signum = sigtimedwait(&set, &info, &timeout);
        if (signum > 0) {
            on_stop_signal(signum);
            break;
        }
        if (errno != EINTR)
            break; /* EAGAIN: the delay is over */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double left = (double)(end.tv_sec - now.tv_sec) + (double)(end.tv_nsec - now.tv_nsec) / 1e9;
        if (left <= 0)
            break;
        timeout.tv_sec = (time_t)left;
        timeout.tv_nsec = (long)((left - (double)(time_t)left) * 1e9);
    }
    unblock_stop_signals();
}

/* ------------------------------------------------------------------------------------------------
 * The gate: lines from fd 0, read only while a stop signal can interrupt the wait. */

typedef struct {
    char *data;
    size_t len, cap;
    bool eof;
} Gate;

/* The next line (without its newline) in `line`: 1, or 0 at EOF before a complete line, or -1 when
 * a stop signal came while waiting. */
static int gate_read_line(Gate *gate, char **line, size_t *len) {
    sigset_t unblocked;
    sigprocmask(SIG_SETMASK, NULL, &unblocked);
    for (size_t i = 0; i < sizeof STOP_SIGNALS / sizeof STOP_SIGNALS[0]; i++)
        sigdelset(&unblocked, STOP_SIGNALS[i]);
    for (;;) {
        char *newline = gate->len ? memchr(gate->data, '\n', gate->len) : NULL;
        if (newline || gate->eof)
            take_pending_stop_signals(); /* one that came with the line or the EOF comes first */
        if (received && !released)
            return -1;
        if (newline) {
            *len = (size_t)(newline - gate->data);
            *line = malloc(*len + 1);
            if (!*line)
                abort();
            memcpy(*line, gate->data, *len);
            (*line)[*len] = '\0';
            memmove(gate->data, newline + 1, gate->len - *len - 1);
            gate->len -= *len + 1;
            return 1;
        }
        if (gate->eof)
            return 0;
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        int ready = ppoll(&pfd, 1, NULL, &unblocked); /* stop signals are let in only here */
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            gate->eof = true;
            continue;
        }
        if (gate->len + LOG_PUMP_CHUNK + 1 > gate->cap) {
            gate->cap = gate->len + LOG_PUMP_CHUNK + 1;
            if (gate->cap > SPEC_MAX_BYTES + LOG_PUMP_CHUNK) {
                gate->eof = true; /* a line that long is no spec: treated as a gate that closed */
                continue;
            }
            gate->data = realloc(gate->data, gate->cap);
            if (!gate->data)
                abort();
        }
        ssize_t n = read(0, gate->data + gate->len, gate->cap - gate->len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            gate->eof = true;
        else
            gate->len += (size_t)n;
    }
}

/* ------------------------------------------------------------------------------------------------
 * One run: the child drops privileges and execs; the parent waits and reports. The child's failure
 * comes back over a close-on-exec pipe as "step\nmessage": EOF means the exec worked. */

typedef struct {
    gid_t *list;
    int count;
    int error; /* the lookup's errno, 0 if it worked */
} Groups;

static Groups lookup_groups(const Spec *spec) {
    /* Behind the closed gate: NSS may load a module and ask a service (milliseconds that would
     * otherwise come between the release and the command). */
    Groups groups = {0};
    int count = 32;
    for (int attempt = 0; attempt < 8; attempt++) {
        gid_t *list = realloc(groups.list, (size_t)count * sizeof *list);
        if (!list)
            abort();
        groups.list = list;
        int n = count;
        errno = 0;
        if (getgrouplist(spec->user, (gid_t)spec->gid, groups.list, &n) >= 0) {
            groups.count = n;
            return groups;
        }
        count = n > count ? n : count * 2;
    }
    groups.error = errno ? errno : ENOMEM;
    return groups;
}

static void child_report(int fd, const char *step, const char *message) {
    Buf report = {0};
    buf_printf(&report, "%s\n%s", step, message);
    (void)write_all(fd, report.data, report.len);
    _exit(CHILD_FAILED_STATUS);
}

static bool each_in(const gid_t *these, int count, const gid_t *those, int those_count) {
    for (int i = 0; i < count; i++) {
        bool found = false;
        for (int j = 0; j < those_count && !found; j++)
            found = these[i] == those[j];
        if (!found)
            return false;
    }
    return true;
}

static void drop_privileges(const Spec *spec, const Groups *groups, int error_fd) {
    char message[256];
    if (groups->error) {
        snprintf(message, sizeof message, "getgrouplist: %s", strerror(groups->error));
        child_report(error_fd, "setup", message);
    }
    uid_t uid = (uid_t)spec->uid;
    gid_t gid = (gid_t)spec->gid;
    const char *step = "setgroups";
    if (setgroups((size_t)groups->count, groups->list) == 0) {
        step = "setresgid";
        if (setresgid(gid, gid, gid) == 0) {
            step = "setresuid";
            if (setresuid(uid, uid, uid) == 0)
                step = NULL;
        }
    }
    if (step) {
        snprintf(message, sizeof message, "%s: %s", step, strerror(errno));
        child_report(error_fd, "setup", message);
    }
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    gid_t now[NGROUPS_MAX];
    int count = getgroups(NGROUPS_MAX, now);
    /* as sets, both ways: the order and repeats are the kernel's */
    bool same = count >= 0 && each_in(now, count, groups->list, groups->count) &&
                each_in(groups->list, groups->count, now, count);
    if (getresuid(&ru, &eu, &su) != 0 || getresgid(&rg, &eg, &sg) != 0 || ru != uid || eu != uid ||
        su != uid || rg != gid || eg != gid || sg != gid || !same) {
        snprintf(message, sizeof message, "privileges not dropped to uid %lld gid %lld", spec->uid,
                 spec->gid);
        child_report(error_fd, "setup", message);
    }
}

static void enter_cwd(const Spec *spec, int error_fd) {
    if (chdir(spec->cwd) == 0)
        return;
    Buf message = {0};
    buf_printf(&message, "%s: %s", spec->cwd, strerror(errno));
    if (strchr(spec->cwd, '~'))
        buf_printf(&message, "; the path holds a literal '~': the shell expands ~ only at the start of "
                             "a word (not after --cwd=), so write --cwd ~/dir or --cwd=$HOME/dir");
    child_report(error_fd, "chdir", message.data);
}

static void close_fds_except(int keep) {
    if (keep > 3)
        syscall(SYS_close_range, 3u, (unsigned)keep - 1, 0u);
    syscall(SYS_close_range, (unsigned)keep + 1, ~0u, 0u);
}

static void reset_signals(void) {
    for (int signum = 1; signum < NSIG; signum++)
        if (signum != SIGKILL && signum != SIGSTOP)
            signal(signum, SIG_DFL); /* fails harmlessly for the numbers that are no signal */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Python's os.execvpe: a name without '/' is looked up in the job env's PATH (os.defpath without
 * one), each directory tried in turn; the error kept is the first that is not ENOENT or ENOTDIR. */
static void exec_command(const Spec *spec, char **env, int error_fd) {
    const char *program = spec->argv[0];
    int error = 0;
    if (strchr(program, '/')) {
        execve(program, spec->argv, env);
        error = errno;
    } else {
        const char *path = spec->path_variable ? spec->path_variable : DEFAULT_PATH;
        int saved = 0;
        const char *dir = path;
        for (;;) {
            const char *end = strchr(dir, ':');
            size_t len = end ? (size_t)(end - dir) : strlen(dir);
            Buf candidate = {0};
            buf_add(&candidate, dir, len);
            if (len > 0)
                buf_add(&candidate, "/", 1);
            buf_add(&candidate, program, strlen(program));
            execve(candidate.data, spec->argv, env);
            error = errno;
            if (error != ENOENT && error != ENOTDIR && !saved)
                saved = error;
            free(candidate.data);
            if (!end)
                break;
            dir = end + 1;
        }
        if (saved)
            error = saved;
    }
    Buf message = {0};
    buf_printf(&message, "%s: %s", program, strerror(error));
    if (!strchr(program, '/') && (error == ENOENT || error == EACCES)) {
        buf_printf(&message, " (searched PATH=%s)", spec->path_variable ? spec->path_variable : "");
        if (strcmp(program, "python") == 0)
            buf_printf(&message, "; this system may have no `python`: run python3, or submit from an "
                                 "activated virtualenv (the job inherits its PATH)");
    }
    child_report(error_fd, "exec", message.data);
}

static void run_child(const Spec *spec, long long run, int error_fd, const Groups *groups) {
    drop_privileges(spec, groups, error_fd);
    enter_cwd(spec, error_fd);
    umask((mode_t)spec->umask);
    close_fds_except(error_fd);
    reset_signals();
    Buf run_var = {0};
    buf_printf(&run_var, RUN_ENV_VAR "=%lld", run);
    spec->env[spec->envc] = run_var.data;
    spec->env[spec->envc + 1] = NULL;
    exec_command(spec, spec->env, error_fd);
}

static Reason step_reason(const char *step) {
    if (strcmp(step, "chdir") == 0)
        return REASON_CHDIR_FAILED;
    if (strcmp(step, "exec") == 0)
        return REASON_EXEC_FAILED;
    return REASON_SETUP_FAILED;
}

static Run setup_failure(long long number, double started_at, const char *what) {
    Buf message = {0};
    buf_printf(&message, "%s: %s", what, strerror(errno));
    log_line("setup failed: %s", message.data);
    Run run = run_from_failure(number, started_at, wall_now(), REASON_SETUP_FAILED, message.data);
    free(message.data);
    return run;
}

/* Run the command once and wait for it; false (and no run) if a stop signal came before it started. */
static bool run_once(const Spec *spec, long long number, const Groups *groups, Run *out) {
    double started_at = wall_now();
    int error_pipe[2];
    if (pipe2(error_pipe, O_CLOEXEC) != 0) {
        *out = setup_failure(number, started_at, "pipe");
        return true;
    }
    block_stop_signals();
    if (received) {
        unblock_stop_signals();
        close(error_pipe[0]);
        close(error_pipe[1]);
        return false;
    }
    started_at = wall_now();
    pid_t pid = fork();
    if (pid == 0)
        run_child(spec, number, error_pipe[1], groups);
    if (pid < 0) {
        int saved = errno;
        unblock_stop_signals();
        close(error_pipe[0]);
        close(error_pipe[1]);
        errno = saved;
        *out = setup_failure(number, started_at, "fork");
        return true;
    }
    child_pid = pid;
    unblock_stop_signals(); /* a signal that arrived meanwhile is forwarded now */
    close(error_pipe[1]);
    Buf failure = {0};
    char chunk[4096];
    for (;;) {
        ssize_t n = read(error_pipe[0], chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        buf_add(&failure, chunk, (size_t)n);
    }
    close(error_pipe[0]);
    /* Wait without reaping first: until it is reaped the pid cannot be reused, so a signal
     * forwarded meanwhile cannot hit some other process. */
    siginfo_t info;
    int status = 0;
    bool reaped = false;
    while (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT) != 0 && errno == EINTR)
        ;
    block_stop_signals();
    child_pid = 0;
    pid_t waited;
    while ((waited = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
        ;
    reaped = waited == pid;
    unblock_stop_signals();
    double ended_at = wall_now();
    if (failure.len) {
        char *newline = memchr(failure.data, '\n', failure.len);
        const char *step = "setup", *message = "the child reported a malformed error";
        if (newline) {
            *newline = '\0';
            step = failure.data;
            message = newline + 1;
        }
        log_line("%s failed: %s", step, message);
        *out = run_from_failure(number, started_at, ended_at, step_reason(step), message);
        free(failure.data);
        return true;
    }
    if (!reaped) {
        *out = run_from_failure(number, started_at, ended_at, REASON_LOST,
                                "the command's exit status was lost (reaped elsewhere)");
        return true;
    }
    *out = run_from_status(number, started_at, ended_at, status);
    return true;
}

/* ------------------------------------------------------------------------------------------------
 * The whole job. */

static const char *stop_signal_phase(const Spec *spec, const Run *runs, size_t count) {
    if (!received)
        return NULL;
    if (received_during_run)
        return "run";
    bool would_go_on = should_run_again(&runs[count - 1], (long long)count, spec, 0);
    return would_go_on ? "between-runs" : "after-last-run";
}

static void encode_record_tail(Buf *b, const Spec *spec, size_t runs, const char *phase) {
    json_key(b, "runs", false);
    buf_printf(b, "%zu", runs);
    json_key(b, "max_runs", false);
    buf_printf(b, "%lld", spec->max_runs);
    json_key(b, "terminated_by_signal", false);
    json_optional_int(b, received != 0, received);
    json_key(b, "stop_signal_phase", false);
    if (phase)
        json_string(b, phase);
    else
        buf_add(b, "null", 4);
    double age = 0;
    bool has_age = received_after_s(&age);
    json_key(b, "stop_signal_after_s", false);
    json_optional_time(b, has_age, age);
}

static int write_exit_record(const Spec *spec, const Buf *record) {
    if (write_atomic(spec->exit_record, record->data, record->len) != 0) {
        log_line("cannot write the exit record %s: %s", spec->exit_record, strerror(errno));
        return EXIT_RECORD_FAILED;
    }
    return EXIT_RECORDED;
}

static int finish_unreleased(const Spec *spec, const char *detail, bool finish_pump) {
    if (finish_pump)
        pump_finish(spec->log_drain_s); /* our last words go to the log file directly */
    log_line("%s", detail);
    Buf record = {0};
    buf_add(&record, "{", 1);
    json_key(&record, "job_id", true);
    buf_printf(&record, "%lld", spec->job_id);
    json_key(&record, "started_at", false);
    buf_add(&record, "null", 4);
    json_key(&record, "ended_at", false);
    json_optional_time(&record, true, wall_now());
    json_key(&record, "exit_code", false);
    buf_add(&record, "null", 4);
    json_key(&record, "signal", false);
    buf_add(&record, "null", 4);
    json_key(&record, "reason", false);
    json_string(&record, "start-failed");
    json_key(&record, "detail", false);
    json_string(&record, detail);
    json_key(&record, "leftover_processes", false);
    buf_add(&record, "0", 1);
    json_key(&record, "leftovers_counted", false);
    buf_add(&record, "false", 5);
    encode_record_tail(&record, spec, 0, NULL);
    buf_add(&record, "}\n", 2);
    int code = write_exit_record(spec, &record);
    free(record.data);
    return code;
}

static int finish_runs(const Spec *spec, const Run *runs, size_t count, const char *cgroup_root) {
    long leftovers = own_leftover_processes(cgroup_root);
    const char *phase = stop_signal_phase(spec, runs, count);
    const Run *last = &runs[count - 1];
    Buf detail = {0};
    buf_add(&detail, last->detail, strlen(last->detail));
    if (leftovers < 0) {
        if (detail.len)
            buf_add(&detail, "; ", 2);
        buf_add(&detail, LEFTOVERS_UNAVAILABLE, strlen(LEFTOVERS_UNAVAILABLE));
    }
    Buf record = {0};
    buf_add(&record, "{", 1);
    json_key(&record, "job_id", true);
    buf_printf(&record, "%lld", spec->job_id);
    json_key(&record, "started_at", false);
    json_optional_time(&record, true, runs[0].started_at);
    json_key(&record, "ended_at", false);
    json_optional_time(&record, true, wall_now());
    json_key(&record, "exit_code", false);
    json_optional_int(&record, last->has_exit_code, last->exit_code);
    json_key(&record, "signal", false);
    json_optional_int(&record, last->has_signal, last->signal);
    json_key(&record, "reason", false);
    json_string(&record, REASON_TEXT[last->reason]);
    json_key(&record, "detail", false);
    json_string(&record, detail.data ? detail.data : "");
    json_key(&record, "leftover_processes", false);
    buf_printf(&record, "%ld", leftovers < 0 ? 0 : leftovers);
    /* Counted and none: the scope empties, and ends, as this supervisor exits (the daemon then
     * asks for no stop). */
    json_key(&record, "leftovers_counted", false);
    buf_add(&record, leftovers >= 0 ? "true" : "false", leftovers >= 0 ? 4 : 5);
    encode_record_tail(&record, spec, count, phase);
    encode_log_fate(&record);
    buf_add(&record, "}\n", 2);
    free(detail.data);
    int code = write_exit_record(spec, &record);
    free(record.data);
    return code;
}

static int supervise(const char *cgroup_root) {
    read_own_start();
    block_stop_signals();
    install_signals();
    Gate gate = {0};
    char *line = NULL;
    size_t len = 0;
    char name[32];
    int got = gate_read_line(&gate, &line, &len);
    if (got < 0) {
        log_line("received %s before the job spec; nothing was run", signal_name(received, name, sizeof name));
        return EXIT_NO_SPEC;
    }
    if (got == 0) {
        log_line("the gate closed before the job spec arrived; nothing was run");
        return EXIT_NO_SPEC;
    }
    Spec spec = {0};
    char why[512];
    if (!parse_spec(line, len, &spec, why, sizeof why)) {
        log_line("%s; nothing was run", why);
        return EXIT_NO_SPEC;
    }
    Groups groups = lookup_groups(&spec);
    /* The log pump's pipe and thread are set up behind the gate too, not between release and
     * command (stop signals are blocked here, so one caught meanwhile finds the pump in place). */
    if (pump_start(spec.log_max_bytes) != 0) {
        Buf detail = {0};
        buf_printf(&detail, "the log pump could not be set up: %s; nothing was run", strerror(errno));
        int code = finish_unreleased(&spec, detail.data, true);
        free(detail.data);
        return code;
    }
    char *release = NULL;
    got = gate_read_line(&gate, &release, &len);
    Buf detail = {0};
    if (got < 0) {
        buf_printf(&detail, "received %s before release; nothing was run",
                   signal_name(received, name, sizeof name));
    } else if (got == 0 || strcmp(release, "release") != 0 || len != strlen("release")) {
        buf_printf(&detail, "the gate %s; nothing was run",
                   got == 0 ? "closed before release" : "sent something other than release");
    }
    if (detail.len) {
        int code = finish_unreleased(&spec, detail.data, true);
        free(detail.data);
        return code;
    }
    released = 1;
    unblock_stop_signals();
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (devnull >= 0) {
        dup2(devnull, 0);
        close(devnull);
    }
    Run *runs = NULL;
    size_t count = 0;
    for (;;) {
        runs = realloc(runs, (count + 1) * sizeof *runs);
        if (!runs)
            abort();
        if (!run_once(&spec, (long long)count + 1, &groups, &runs[count]))
            break;
        count++;
        if (append_run(spec.runs_file, &runs[count - 1]) != 0)
            log_line("cannot append to %s: %s", spec.runs_file, strerror(errno));
        if (!should_run_again(&runs[count - 1], (long long)count, &spec, received))
            break;
        pause_between_runs(spec.restart_delay_s);
    }
    pump_finish(spec.log_drain_s);
    if (count == 0) { /* a stop signal came after release but before the first run started */
        buf_printf(&detail, "received %s before the first run; nothing was run",
                   signal_name(received, name, sizeof name));
        int code = finish_unreleased(&spec, detail.data, false);
        free(detail.data);
        return code;
    }
    return finish_runs(&spec, runs, count, cgroup_root);
}

int main(int argc, char **argv) {
    const char *cgroup_root = DEFAULT_CGROUP_ROOT;
    if (argc == 3 && strcmp(argv[1], "--cgroup-root") == 0) {
        cgroup_root = argv[2];
    } else if (argc != 1) {
        log_line("usage: gpujob-supervisor [--cgroup-root DIR]");
        return EXIT_USAGE;
    }
    /* Nothing but the gate and the log is ours to hold (whatever started us may have left more). */
    syscall(SYS_close_range, 3u, ~0u, 0u);
    return supervise(cgroup_root);
}
