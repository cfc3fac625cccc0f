/*
 * nvml_double.c -- a scripted test double of NVIDIA's NVML library (libnvidia-ml.so.1).
 *
 * Built against NVIDIA's own nvml.h (PyPI package nvidia-nvml-dev, see build.sh), so every
 * struct, enum and prototype below is NVML's, not a hand copy: a definition that drifts from
 * the header does not compile.  The real pynvml (nvidia-ml-py) dlopens it by name when it is
 * first on LD_LIBRARY_PATH.  Nothing here talks to a GPU.
 *
 * BEHAVIOUR is scripted by a text file: $NVML_DOUBLE_SCRIPT, default /run/nvml-double/script.
 * The file is stat()ed on every call and re-parsed when its device, inode, size, mtime or
 * ctime changed (write it with temp + rename, as tests/nvml_double/script.py does, and every
 * change is seen by the very next call); otherwise the parsed copy is used.
 *
 *   - missing file: like a machine without the driver: nvmlInit* returns
 *     NVML_ERROR_DRIVER_NOT_LOADED; an already initialised library sees zero devices.
 *   - unparsable or unreadable file: one line "nvml-double: PATH:LINE: reason" on stderr
 *     (once per version of the file) and every call, nvmlInit* included, returns
 *     NVML_ERROR_UNKNOWN until the file is fixed.
 *
 * SCRIPT FORMAT: one directive per line; blank lines and lines whose first non-blank
 * character is '#' are ignored; tokens are separated by blanks; numbers are decimal
 * (or 0x hex).  ERROR is an nvmlReturn_t name without the NVML_ERROR_ prefix
 * (NOT_SUPPORTED, GPU_IS_LOST, NO_PERMISSION, DRIVER_NOT_LOADED, ...) or SUCCESS.
 *
 *   init ERROR|SUCCESS                  what every nvmlInit* returns (default SUCCESS);
 *                                       it does not affect an already initialised library
 *   driver VERSION                      nvmlSystemGetDriverVersion (default 550.54.14)
 *   device INDEX [uuid=UUID] [memory_total=B] [memory_used=B] [memory_reserved=B]
 *          [util_gpu=PCT] [util_memory=PCT] [pci_bus_id=DDDDDDDD:BB:DD.0]
 *          [pci_device_id=N] [minor=N] [name=REST OF LINE, MAY CONTAIN BLANKS]
 *                                       name= must come last.  Indices must be 0..N-1,
 *                                       each once (at most 64 devices).  memory_used is
 *                                       what nvmlDeviceGetMemoryInfo (v1) reports as used
 *                                       (it includes memory_reserved); free = total - used.
 *                                       nvmlDeviceGetMemoryInfo_v2 reports reserved
 *                                       separately and used = memory_used - memory_reserved.
 *                                       minor: nvmlDeviceGetMinorNumber (/dev/nvidiaN),
 *                                       default the index.
 *   process DEVICE compute|graphics|mps pid=PID used_memory=B|-1
 *           [gpu_instance_id=N] [compute_instance_id=N]
 *                                       listed in file order; pid is reported as given
 *                                       (any 32-bit value, 0 and 4294967295 included);
 *                                       used_memory=-1 is NVML_VALUE_NOT_AVAILABLE
 *                                       (0xFFFFFFFFFFFFFFFF); the instance ids default to
 *                                       0xFFFFFFFF (no MIG), as NVML reports them.
 *   error DEVICE|* FUNCTION ERROR       FUNCTION returns ERROR for that device (for
 *                                       nvmlDeviceGetHandleByIndex the device is the index
 *                                       asked for; functions without a device match * only)
 *   delay DEVICE|* FUNCTION MS          FUNCTION sleeps MS milliseconds first (a wedged
 *                                       driver); the sleep holds no lock, so other calls,
 *                                       on other threads, go on meanwhile
 *
 * FUNCTION is an exported symbol (nvmlDeviceGetComputeRunningProcesses_v3: that version only)
 * or its unversioned family name (nvmlDeviceGetComputeRunningProcesses: _v3, _v2 and plain;
 * nvmlInit: nvmlInit, nvmlInit_v2 and nvmlInitWithFlags).  For one call, a line naming the
 * device beats a "*" line, and of two equally specific lines the later one wins.  Unknown
 * functions, errors, directives or keys are parse errors, so typos fail loudly.
 *
 * ORDER OF EFFECTS in every call: delay, then UNINITIALIZED (before nvmlInit / after the
 * last nvmlShutdown), then INVALID_ARGUMENT for a NULL or foreign handle, GPU_IS_LOST for a
 * handle whose device has left the script, then a scripted error, then INVALID_ARGUMENT for
 * NULL output pointers, then the real answer.
 *
 * Process lists follow NVML's size protocol: *infoCount smaller than the list (the usual
 * first call is *infoCount == 0, infos == NULL) gives NVML_ERROR_INSUFFICIENT_SIZE with
 * *infoCount set to the number needed; an empty list gives NVML_SUCCESS with *infoCount 0;
 * infos == NULL with *infoCount > 0 gives NVML_ERROR_INVALID_ARGUMENT.  Strings too long for
 * the caller's buffer give NVML_ERROR_INSUFFICIENT_SIZE.
 *
 * Besides NVML's symbols the library exports one of its own, nvml_double_sizeof(type name),
 * the header's sizeof of the structs above, so a test can check pynvml's ctypes layouts.
 */

#define _POSIX_C_SOURCE 200809L
/* Plain (unversioned) symbols such as nvmlInit and nvmlDeviceGetComputeRunningProcesses are
 * declared with their legacy signatures only when this is defined; real NVML exports them. */
#define NVML_NO_UNVERSIONED_FUNC_DEFS

/* Built with -fvisibility=hidden: only what nvml.h declares is exported. */
#pragma GCC visibility push(default)
#include <stddef.h>
#include <nvml.h>
size_t nvml_double_sizeof(const char *type_name);
#pragma GCC visibility pop

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define DEFAULT_SCRIPT "/run/nvml-double/script"
#define DEFAULT_DRIVER "550.54.14"
#define MAX_DEVICES 64
#define NO_DEVICE (-1)    /* a call without a device, or a "*" rule */
#define NOT_AVAILABLE_U64 0xFFFFFFFFFFFFFFFFULL
#define NO_INSTANCE 0xFFFFFFFFU
#define PCI_SUBSYSTEM_ID 0x16C110DEU

enum proc_kind { KIND_COMPUTE, KIND_GRAPHICS, KIND_MPS, KIND_COUNT };
static const char *const kind_names[KIND_COUNT] = {"compute", "graphics", "mps"};

struct proc {
    unsigned int pid;
    unsigned long long used_memory;
    unsigned int gpu_instance_id;
    unsigned int compute_instance_id;
};

struct proc_list {
    struct proc *v;
    size_t n, cap;
};

struct device {
    int defined;
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    unsigned long long memory_total, memory_used, memory_reserved;
    unsigned int util_gpu, util_memory;
    unsigned int pci_domain, pci_bus, pci_device, pci_device_id;
    unsigned int minor;          /* /dev/nvidia<minor> */
    struct proc_list procs[KIND_COUNT];
};

enum rule_kind { RULE_ERROR, RULE_DELAY };

struct rule {
    enum rule_kind kind;
    int device;          /* NO_DEVICE for "*" */
    char function[64];
    long value;          /* nvmlReturn_t for RULE_ERROR, milliseconds for RULE_DELAY */
};

struct script {
    int present;         /* the file exists */
    int ok;              /* it parsed */
    nvmlReturn_t init_result;
    char driver[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
    unsigned int device_count;
    struct device devices[MAX_DEVICES];
    struct rule *rules;
    size_t rule_count, rule_cap;
};

/* The opaque nvmlDevice_t points at one of these; handles stay valid across script changes. */
struct nvmlDevice_st {
    unsigned int index;
};
static struct nvmlDevice_st handles[MAX_DEVICES];

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct script *current;          /* guarded by lock */
static struct {
    int valid;
    char path[4096];
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
} loaded;                               /* which file `current` came from; guarded by lock */
static unsigned int init_refcount;      /* guarded by lock */

/* ---------------------------------------------------------------------------------------- */
/* Names */

struct error_name {
    const char *name;
    nvmlReturn_t value;
};

#define E(x) {#x, NVML_ERROR_##x}
static const struct error_name error_names[] = {
    {"SUCCESS", NVML_SUCCESS},
    E(UNINITIALIZED), E(INVALID_ARGUMENT), E(NOT_SUPPORTED), E(NO_PERMISSION),
    E(ALREADY_INITIALIZED), E(NOT_FOUND), E(INSUFFICIENT_SIZE), E(INSUFFICIENT_POWER),
    E(DRIVER_NOT_LOADED), E(TIMEOUT), E(IRQ_ISSUE), E(LIBRARY_NOT_FOUND),
    E(FUNCTION_NOT_FOUND), E(CORRUPTED_INFOROM), E(GPU_IS_LOST), E(RESET_REQUIRED),
    E(OPERATING_SYSTEM), E(LIB_RM_VERSION_MISMATCH), E(IN_USE), E(MEMORY), E(NO_DATA),
    E(VGPU_ECC_NOT_SUPPORTED), E(INSUFFICIENT_RESOURCES), E(FREQ_NOT_SUPPORTED),
    E(ARGUMENT_VERSION_MISMATCH), E(DEPRECATED), E(NOT_READY), E(GPU_NOT_FOUND),
    E(INVALID_STATE), E(RESET_TYPE_NOT_SUPPORTED), E(UNKNOWN),
};
#undef E

/* Every scriptable symbol and its family (the name a rule may use for all its versions). */
static const struct {
    const char *symbol, *family;
} functions[] = {
    {"nvmlInit", "nvmlInit"},
    {"nvmlInit_v2", "nvmlInit"},
    {"nvmlInitWithFlags", "nvmlInit"},
    {"nvmlShutdown", "nvmlShutdown"},
    {"nvmlSystemGetDriverVersion", "nvmlSystemGetDriverVersion"},
    {"nvmlDeviceGetCount", "nvmlDeviceGetCount"},
    {"nvmlDeviceGetCount_v2", "nvmlDeviceGetCount"},
    {"nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByIndex"},
    {"nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex"},
    {"nvmlDeviceGetUUID", "nvmlDeviceGetUUID"},
    {"nvmlDeviceGetName", "nvmlDeviceGetName"},
    {"nvmlDeviceGetIndex", "nvmlDeviceGetIndex"},
    {"nvmlDeviceGetMinorNumber", "nvmlDeviceGetMinorNumber"},
    {"nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMemoryInfo"},
    {"nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetMemoryInfo"},
    {"nvmlDeviceGetUtilizationRates", "nvmlDeviceGetUtilizationRates"},
    {"nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses"},
    {"nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetComputeRunningProcesses"},
    {"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses"},
    {"nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"},
    {"nvmlDeviceGetGraphicsRunningProcesses_v2", "nvmlDeviceGetGraphicsRunningProcesses"},
    {"nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses"},
    {"nvmlDeviceGetMPSComputeRunningProcesses", "nvmlDeviceGetMPSComputeRunningProcesses"},
    {"nvmlDeviceGetMPSComputeRunningProcesses_v2", "nvmlDeviceGetMPSComputeRunningProcesses"},
    {"nvmlDeviceGetMPSComputeRunningProcesses_v3", "nvmlDeviceGetMPSComputeRunningProcesses"},
    {"nvmlDeviceGetPciInfo", "nvmlDeviceGetPciInfo"},
    {"nvmlDeviceGetPciInfo_v2", "nvmlDeviceGetPciInfo"},
    {"nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetPciInfo"},
    {"nvmlDeviceGetPciInfoExt", "nvmlDeviceGetPciInfoExt"},
};
#define N_FUNCTIONS (sizeof functions / sizeof functions[0])

static const char *family_of(const char *symbol)
{
    for (size_t i = 0; i < N_FUNCTIONS; i++)
        if (strcmp(functions[i].symbol, symbol) == 0)
            return functions[i].family;
    return symbol;
}

static int known_function(const char *name)
{
    for (size_t i = 0; i < N_FUNCTIONS; i++)
        if (strcmp(functions[i].symbol, name) == 0 || strcmp(functions[i].family, name) == 0)
            return 1;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Parsing */

static void script_free(struct script *s)
{
    if (!s)
        return;
    for (unsigned int d = 0; d < MAX_DEVICES; d++)
        for (int k = 0; k < KIND_COUNT; k++)
            free(s->devices[d].procs[k].v);
    free(s->rules);
    free(s);
}

static struct script *script_new(void)
{
    struct script *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->ok = 1;
    s->init_result = NVML_SUCCESS;
    snprintf(s->driver, sizeof s->driver, "%s", DEFAULT_DRIVER);
    return s;
}

struct parser {
    const char *path;
    unsigned long line;
    char msg[256];
};

#define S(text) ((text) ? (text) : "")

__attribute__((format(printf, 2, 3))) static int fail(struct parser *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->msg, sizeof p->msg, fmt, ap);
    va_end(ap);
    return -1;
}

/* Next blank-separated token of *cursor, NUL-terminated in place; NULL at end of line. */
static char *next_token(char **cursor)
{
    char *s = *cursor;
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s == '\0') {
        *cursor = s;
        return NULL;
    }
    char *start = s;
    while (*s && *s != ' ' && *s != '\t')
        s++;
    if (*s)
        *s++ = '\0';
    *cursor = s;
    return start;
}

static int parse_u64(const char *text, unsigned long long *out)
{
    if (!text || !*text || *text == '-' || *text == '+' || *text == ' ')
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 0);
    if (errno || *end)
        return -1;
    *out = v;
    return 0;
}

static int parse_u32(const char *text, unsigned int *out)
{
    unsigned long long v;
    if (parse_u64(text, &v) || v > 0xFFFFFFFFULL)
        return -1;
    *out = (unsigned int)v;
    return 0;
}

static int parse_error_name(const char *text, nvmlReturn_t *out)
{
    for (size_t i = 0; i < sizeof error_names / sizeof error_names[0]; i++)
        if (strcmp(error_names[i].name, text) == 0) {
            *out = error_names[i].value;
            return 0;
        }
    return -1;
}

/* "*" or a device index below MAX_DEVICES (checked against the device count later). */
static int parse_device_ref(const char *text, int allow_star, int *out)
{
    unsigned int v;
    if (allow_star && text && strcmp(text, "*") == 0) {
        *out = NO_DEVICE;
        return 0;
    }
    if (parse_u32(text, &v) || v >= MAX_DEVICES)
        return -1;
    *out = (int)v;
    return 0;
}

static int copy_string(char *dst, size_t size, const char *src)
{
    if (strlen(src) >= size)
        return -1;
    memcpy(dst, src, strlen(src) + 1);
    return 0;
}

static int parse_bus_id(const char *text, struct device *d)
{
    unsigned int domain, bus, dev, function;
    char extra;
    if (sscanf(text, "%x:%x:%x.%x%c", &domain, &bus, &dev, &function, &extra) != 4 || bus > 0xFF ||
        dev > 0x1F || function != 0)
        return -1;
    d->pci_domain = domain;
    d->pci_bus = bus;
    d->pci_device = dev;
    return 0;
}

static int parse_device(struct parser *p, struct script *s, char *rest)
{
    int index;
    char *tok = next_token(&rest);
    if (parse_device_ref(tok, 0, &index))
        return fail(p, "device: bad index '%s' (0..63)", S(tok));
    struct device *d = &s->devices[index];
    if (d->defined)
        return fail(p, "device %s defined twice", tok);
    d->defined = 1;
    snprintf(d->uuid, sizeof d->uuid, "GPU-00000000-0000-0000-0000-%012x", (unsigned int)index);
    snprintf(d->name, sizeof d->name, "NVIDIA Double GPU");
    d->memory_total = 80ULL << 30;
    d->pci_bus = (unsigned int)index + 1;
    d->pci_device_id = 0x233010DE; /* 10DE: NVIDIA; 2330: H100 SXM5 80GB */
    d->minor = (unsigned int)index;

    while ((tok = next_token(&rest))) {
        if (strncmp(tok, "name=", 5) == 0) {
            /* The rest of the line, blanks included, is the name. */
            if (*rest)
                tok[strlen(tok)] = ' ';   /* undo next_token's NUL */
            char *name = tok + 5;
            size_t len = strlen(name);
            while (len && (name[len - 1] == ' ' || name[len - 1] == '\t'))
                name[--len] = '\0';
            if (copy_string(d->name, sizeof d->name, name))
                return fail(p, "device: name longer than %d bytes", NVML_DEVICE_NAME_V2_BUFFER_SIZE - 1);
            return 0;
        }
        char *value = strchr(tok, '=');
        if (!value)
            return fail(p, "device: expected key=value, got '%s'", tok);
        *value++ = '\0';
        int bad;
        if (strcmp(tok, "uuid") == 0)
            bad = copy_string(d->uuid, sizeof d->uuid, value) || !*value;
        else if (strcmp(tok, "memory_total") == 0)
            bad = parse_u64(value, &d->memory_total);
        else if (strcmp(tok, "memory_used") == 0)
            bad = parse_u64(value, &d->memory_used);
        else if (strcmp(tok, "memory_reserved") == 0)
            bad = parse_u64(value, &d->memory_reserved);
        else if (strcmp(tok, "util_gpu") == 0)
            bad = parse_u32(value, &d->util_gpu);
        else if (strcmp(tok, "util_memory") == 0)
            bad = parse_u32(value, &d->util_memory);
        else if (strcmp(tok, "pci_bus_id") == 0)
            bad = parse_bus_id(value, d);
        else if (strcmp(tok, "pci_device_id") == 0)
            bad = parse_u32(value, &d->pci_device_id);
        else if (strcmp(tok, "minor") == 0)
            bad = parse_u32(value, &d->minor);
        else
            return fail(p, "device: unknown key '%s'", tok);
        if (bad)
            return fail(p, "device: bad value for '%s'", tok);
    }
    return 0;
}

static int parse_process(struct parser *p, struct script *s, char *rest)
{
    int index;
    char *tok = next_token(&rest);
    if (parse_device_ref(tok, 0, &index))
        return fail(p, "process: bad device index '%s'", S(tok));
    tok = next_token(&rest);
    int kind = -1;
    for (int k = 0; tok && k < KIND_COUNT; k++)
        if (strcmp(tok, kind_names[k]) == 0)
            kind = k;
    if (kind < 0)
        return fail(p, "process: expected compute, graphics or mps, got '%s'", S(tok));

    struct proc pr = {0, 0, NO_INSTANCE, NO_INSTANCE};
    int have_pid = 0, have_memory = 0;
    while ((tok = next_token(&rest))) {
        char *value = strchr(tok, '=');
        if (!value)
            return fail(p, "process: expected key=value, got '%s'", tok);
        *value++ = '\0';
        int bad;
        if (strcmp(tok, "pid") == 0) {
            bad = parse_u32(value, &pr.pid);
            have_pid = 1;
        } else if (strcmp(tok, "used_memory") == 0) {
            if (strcmp(value, "-1") == 0) {
                pr.used_memory = NOT_AVAILABLE_U64;
                bad = 0;
            } else {
                bad = parse_u64(value, &pr.used_memory);
            }
            have_memory = 1;
        } else if (strcmp(tok, "gpu_instance_id") == 0) {
            bad = parse_u32(value, &pr.gpu_instance_id);
        } else if (strcmp(tok, "compute_instance_id") == 0) {
            bad = parse_u32(value, &pr.compute_instance_id);
        } else {
            return fail(p, "process: unknown key '%s'", tok);
        }
        if (bad)
            return fail(p, "process: bad value for '%s'", tok);
    }
    if (!have_pid || !have_memory)
        return fail(p, "process: pid= and used_memory= are required");

    struct proc_list *l = &s->devices[index].procs[kind];
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        struct proc *v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return fail(p, "out of memory");
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = pr;
    return 0;
}

static int parse_rule(struct parser *p, struct script *s, enum rule_kind kind, char *rest)
{
    const char *what = kind == RULE_ERROR ? "error" : "delay";
    struct rule r;
    memset(&r, 0, sizeof r);
    r.kind = kind;
    char *tok = next_token(&rest);
    if (parse_device_ref(tok, 1, &r.device))
        return fail(p, "%s: expected a device index or *", what);
    tok = next_token(&rest);
    if (!tok || !known_function(tok))
        return fail(p, "unknown or unscriptable NVML function '%s'", S(tok));
    snprintf(r.function, sizeof r.function, "%s", tok);
    tok = next_token(&rest);
    if (kind == RULE_ERROR) {
        nvmlReturn_t e;
        if (!tok || parse_error_name(tok, &e))
            return fail(p, "error: unknown NVML error name '%s' (e.g. NOT_SUPPORTED)", S(tok));
        r.value = (long)e;
    } else {
        unsigned int ms;
        if (parse_u32(tok, &ms))
            return fail(p, "delay: bad milliseconds '%s'", S(tok));
        r.value = (long)ms;
    }
    if (next_token(&rest))
        return fail(p, "%s: trailing text", what);
    if (s->rule_count == s->rule_cap) {
        size_t cap = s->rule_cap ? s->rule_cap * 2 : 8;
        struct rule *v = realloc(s->rules, cap * sizeof *v);
        if (!v)
            return fail(p, "out of memory");
        s->rules = v;
        s->rule_cap = cap;
    }
    s->rules[s->rule_count++] = r;
    return 0;
}

static int parse_line(struct parser *p, struct script *s, char *line)
{
    char *rest = line;
    char *directive = next_token(&rest);
    if (!directive || directive[0] == '#')
        return 0;
    if (strcmp(directive, "device") == 0)
        return parse_device(p, s, rest);
    if (strcmp(directive, "process") == 0)
        return parse_process(p, s, rest);
    if (strcmp(directive, "error") == 0)
        return parse_rule(p, s, RULE_ERROR, rest);
    if (strcmp(directive, "delay") == 0)
        return parse_rule(p, s, RULE_DELAY, rest);
    if (strcmp(directive, "init") == 0 || strcmp(directive, "driver") == 0) {
        char *value = next_token(&rest);
        if (!value || next_token(&rest))
            return fail(p, "%s: expected exactly one value", directive);
        if (directive[0] == 'i') {
            if (parse_error_name(value, &s->init_result))
                return fail(p, "init: unknown NVML error name '%s'", value);
        } else if (copy_string(s->driver, sizeof s->driver, value)) {
            return fail(p, "driver: version too long");
        }
        return 0;
    }
    return fail(p, "unknown directive '%s'", directive);
}

static int check_script(struct parser *p, struct script *s)
{
    unsigned int n = 0;
    for (unsigned int i = 0; i < MAX_DEVICES; i++)
        if (s->devices[i].defined)
            n = i + 1;
    s->device_count = n;
    p->line = 0;
    for (unsigned int i = 0; i < MAX_DEVICES; i++) {
        struct device *d = &s->devices[i];
        if (i < n && !d->defined)
            return fail(p, "devices must be numbered 0..N-1: device %u is missing", i);
        if (!d->defined && (d->procs[0].n || d->procs[1].n || d->procs[2].n))
            return fail(p, "process on device %u, which no device line defines", i);
        if (d->defined && (d->memory_used > d->memory_total || d->memory_reserved > d->memory_used))
            return fail(p, "device %u: need memory_reserved <= memory_used <= memory_total", i);
    }
    for (size_t i = 0; i < s->rule_count; i++)
        if (s->rules[i].device != NO_DEVICE && (unsigned int)s->rules[i].device >= n)
            return fail(p, "error/delay for device %d, which no device line defines", s->rules[i].device);
    return 0;
}

/* A parsed script, or one with ok == 0 (message on stderr); NULL only when out of memory. */
static struct script *load_script(const char *path)
{
    struct script *s = script_new();
    if (!s)
        return NULL;
    FILE *f = fopen(path, "re");
    if (!f) {
        if (errno == ENOENT || errno == ENOTDIR) {
            s->present = 0;
            s->init_result = NVML_ERROR_DRIVER_NOT_LOADED;
            return s;
        }
        fprintf(stderr, "nvml-double: %s: %s\n", path, strerror(errno));
        s->present = 1;
        s->ok = 0;
        return s;
    }
    s->present = 1;
    struct parser p = {path, 0, ""};
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int rc = 0;
    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
        p.line++;
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        rc = parse_line(&p, s, line);
    }
    free(line);
    fclose(f);
    if (rc == 0)
        rc = check_script(&p, s);
    if (rc) {
        if (p.line)
            fprintf(stderr, "nvml-double: %s:%lu: %s\n", path, p.line, p.msg);
        else
            fprintf(stderr, "nvml-double: %s: %s\n", path, p.msg);
        script_free(s);
        s = script_new();
        if (s) {
            s->present = 1;
            s->ok = 0;
        }
    }
    return s;
}

/* Make `current` match the script file as it is now.  Caller holds lock. */
static void refresh(void)
{
    const char *path = getenv("NVML_DOUBLE_SCRIPT");
    if (!path || !*path)
        path = DEFAULT_SCRIPT;
    struct stat st;
    int exists = stat(path, &st) == 0;
    if (current && loaded.valid && strcmp(loaded.path, path) == 0) {
        if (!exists && loaded.ino == 0)
            return;  /* still missing */
        if (exists && loaded.dev == st.st_dev && loaded.ino == st.st_ino &&
            loaded.size == st.st_size && loaded.mtime.tv_sec == st.st_mtim.tv_sec &&
            loaded.mtime.tv_nsec == st.st_mtim.tv_nsec && loaded.ctime.tv_sec == st.st_ctim.tv_sec &&
            loaded.ctime.tv_nsec == st.st_ctim.tv_nsec)
            return;
    }
    struct script *s = load_script(path);
    if (!s)
        return;  /* out of memory: keep what we have */
    script_free(current);
    current = s;
    memset(&loaded, 0, sizeof loaded);
    loaded.valid = 1;
    snprintf(loaded.path, sizeof loaded.path, "%s", path);
    if (exists) {
        loaded.dev = st.st_dev;
        loaded.ino = st.st_ino;
        loaded.size = st.st_size;
        loaded.mtime = st.st_mtim;
        loaded.ctime = st.st_ctim;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The common prologue of every call */

/* The rule of this kind for symbol on device (NO_DEVICE: calls without one), or NULL. */
static const struct rule *find_rule(enum rule_kind kind, const char *symbol, int device)
{
    const char *family = family_of(symbol);
    const struct rule *best = NULL;
    for (size_t i = 0; i < current->rule_count; i++) {
        const struct rule *r = &current->rules[i];
        if (r->kind != kind || (r->device != NO_DEVICE && r->device != device))
            continue;
        if (strcmp(r->function, symbol) != 0 && strcmp(r->function, family) != 0)
            continue;
        if (!best || r->device != NO_DEVICE || best->device == NO_DEVICE)
            best = r;  /* specific beats "*"; equally specific: the later line wins */
    }
    return best;
}

static void sleep_ms(long ms)
{
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
        ;
}

enum { NEEDS_INIT = 1, HAS_HANDLE = 2 };

/*
 * Run the scripted prologue of `symbol` for `device` (a device index, or NO_DEVICE).
 * On NVML_SUCCESS the lock is held and the caller answers from `current`, then calls leave();
 * on any other result the lock has been released and the caller returns that result.
 */
static nvmlReturn_t enter(const char *symbol, int device, int flags)
{
    pthread_mutex_lock(&lock);
    refresh();
    if (!current) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_MEMORY;
    }
    const struct rule *delay = find_rule(RULE_DELAY, symbol, device);
    if (delay && delay->value > 0) {
        long ms = delay->value;
        pthread_mutex_unlock(&lock);
        sleep_ms(ms);
        pthread_mutex_lock(&lock);
        refresh();
    }
    nvmlReturn_t rc = NVML_SUCCESS;
    const struct rule *error;
    if (!current->ok)
        rc = NVML_ERROR_UNKNOWN;
    else if ((flags & NEEDS_INIT) && init_refcount == 0)
        rc = NVML_ERROR_UNINITIALIZED;
    else if ((flags & HAS_HANDLE) && device == NO_DEVICE)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    else if ((flags & HAS_HANDLE) && (unsigned int)device >= current->device_count)
        rc = NVML_ERROR_GPU_IS_LOST;
    else if ((error = find_rule(RULE_ERROR, symbol, device)))
        rc = (nvmlReturn_t)error->value;
    if (rc != NVML_SUCCESS)
        pthread_mutex_unlock(&lock);
    return rc;
}

static nvmlReturn_t leave(nvmlReturn_t rc)
{
    pthread_mutex_unlock(&lock);
    return rc;
}

/* The index a handle stands for, or NO_DEVICE if it is not one of ours. */
static int handle_index(nvmlDevice_t device)
{
    uintptr_t base = (uintptr_t)handles, p = (uintptr_t)device;
    if (!device || p < base || (p - base) % sizeof handles[0] || (p - base) / sizeof handles[0] >= MAX_DEVICES)
        return NO_DEVICE;
    return (int)((p - base) / sizeof handles[0]);
}

#define ENTER_DEVICE(symbol, device)                                   \
    int idx = handle_index(device);                                    \
    nvmlReturn_t rc = enter(symbol, idx, NEEDS_INIT | HAS_HANDLE);    \
    if (rc != NVML_SUCCESS)                                            \
        return rc;                                                     \
    const struct device *d = &current->devices[idx]

static nvmlReturn_t put_string(char *buf, unsigned int length, const char *value)
{
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

/* ---------------------------------------------------------------------------------------- */
/* Initialisation and errors */

static nvmlReturn_t do_init(const char *symbol)
{
    nvmlReturn_t rc = enter(symbol, NO_DEVICE, 0);
    if (rc != NVML_SUCCESS)
        return rc;
    rc = current->init_result;
    if (rc == NVML_SUCCESS)
        init_refcount++;
    return leave(rc);
}

nvmlReturn_t nvmlInit(void) { return do_init("nvmlInit"); }
nvmlReturn_t nvmlInit_v2(void) { return do_init("nvmlInit_v2"); }

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;  /* NO_GPUS / NO_ATTACH / FORCE_INIT change nothing for a double */
    return do_init("nvmlInitWithFlags");
}

nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t rc = enter("nvmlShutdown", NO_DEVICE, NEEDS_INIT);
    if (rc != NVML_SUCCESS)
        return rc;
    init_refcount--;
    return leave(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    /* The texts of the real library (pynvml carries the same table). */
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: return "ECC is not supported on vGPU";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Insufficient resources";
    case NVML_ERROR_FREQ_NOT_SUPPORTED: return "Frequency not supported";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_DEPRECATED: return "Deprecated";
    case NVML_ERROR_NOT_READY: return "Not ready";
    case NVML_ERROR_GPU_NOT_FOUND: return "GPU not found";
    case NVML_ERROR_INVALID_STATE: return "Invalid state";
    case NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: return "Reset type not supported";
    default: return "Unknown Error";
    }
}

/* ---------------------------------------------------------------------------------------- */
/* System and device queries */

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc = enter("nvmlSystemGetDriverVersion", NO_DEVICE, NEEDS_INIT);
    if (rc != NVML_SUCCESS)
        return rc;
    return leave(put_string(version, length, current->driver));
}

static nvmlReturn_t get_count(const char *symbol, unsigned int *count)
{
    nvmlReturn_t rc = enter(symbol, NO_DEVICE, NEEDS_INIT);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!count)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *count = current->device_count;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount) { return get_count("nvmlDeviceGetCount", deviceCount); }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) { return get_count("nvmlDeviceGetCount_v2", deviceCount); }

static nvmlReturn_t get_handle(const char *symbol, unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter(symbol, index < MAX_DEVICES ? (int)index : NO_DEVICE, NEEDS_INIT);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!device || index >= current->device_count)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    handles[index].index = index;
    *device = &handles[index];
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return get_handle("nvmlDeviceGetHandleByIndex", index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    return get_handle("nvmlDeviceGetHandleByIndex_v2", index, device);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    ENTER_DEVICE("nvmlDeviceGetUUID", device);
    return leave(put_string(uuid, length, d->uuid));
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    ENTER_DEVICE("nvmlDeviceGetName", device);
    return leave(put_string(name, length, d->name));
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    ENTER_DEVICE("nvmlDeviceGetIndex", device);
    (void)d;
    if (!index)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned int)idx;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    ENTER_DEVICE("nvmlDeviceGetMinorNumber", device);
    if (!minorNumber)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *minorNumber = d->minor;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    ENTER_DEVICE("nvmlDeviceGetMemoryInfo", device);
    if (!memory)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    memory->total = d->memory_total;
    memory->used = d->memory_used;
    memory->free = d->memory_total - d->memory_used;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    ENTER_DEVICE("nvmlDeviceGetMemoryInfo_v2", device);
    if (!memory)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (memory->version != nvmlMemory_v2)
        return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory->total = d->memory_total;
    memory->reserved = d->memory_reserved;
    memory->used = d->memory_used - d->memory_reserved;
    memory->free = d->memory_total - d->memory_used;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    ENTER_DEVICE("nvmlDeviceGetUtilizationRates", device);
    if (!utilization)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    utilization->gpu = d->util_gpu;
    utilization->memory = d->util_memory;
    return leave(NVML_SUCCESS);
}

/* version 1: nvmlProcessInfo_v1_t; 2: nvmlProcessInfo_v2_t (== nvmlProcessInfo_t, used by _v3) */
static nvmlReturn_t get_processes(const char *symbol, nvmlDevice_t device, enum proc_kind kind,
                                  unsigned int *infoCount, void *infos, int version)
{
    ENTER_DEVICE(symbol, device);
    const struct proc_list *l = &d->procs[kind];
    if (!infoCount || (*infoCount > 0 && !infos))
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (*infoCount < l->n) {
        *infoCount = (unsigned int)l->n;
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    for (size_t i = 0; i < l->n; i++) {
        const struct proc *p = &l->v[i];
        if (version == 1) {
            nvmlProcessInfo_v1_t *out = (nvmlProcessInfo_v1_t *)infos + i;
            out->pid = p->pid;
            out->usedGpuMemory = p->used_memory;
        } else {
            nvmlProcessInfo_v2_t *out = (nvmlProcessInfo_v2_t *)infos + i;
            out->pid = p->pid;
            out->usedGpuMemory = p->used_memory;
            out->gpuInstanceId = p->gpu_instance_id;
            out->computeInstanceId = p->compute_instance_id;
        }
    }
    *infoCount = (unsigned int)l->n;
    return leave(NVML_SUCCESS);
}

#define PROCESS_FUNCTIONS(Family, kind)                                                          \
    nvmlReturn_t nvmlDeviceGet##Family(nvmlDevice_t device, unsigned int *infoCount,           \
                                       nvmlProcessInfo_v1_t *infos)                             \
    {                                                                                           \
        return get_processes("nvmlDeviceGet" #Family, device, kind, infoCount, infos, 1);      \
    }                                                                                           \
    nvmlReturn_t nvmlDeviceGet##Family##_v2(nvmlDevice_t device, unsigned int *infoCount,      \
                                            nvmlProcessInfo_v2_t *infos)                        \
    {                                                                                           \
        return get_processes("nvmlDeviceGet" #Family "_v2", device, kind, infoCount, infos, 2); \
    }                                                                                           \
    nvmlReturn_t nvmlDeviceGet##Family##_v3(nvmlDevice_t device, unsigned int *infoCount,      \
                                            nvmlProcessInfo_t *infos)                           \
    {                                                                                           \
        return get_processes("nvmlDeviceGet" #Family "_v3", device, kind, infoCount, infos, 2); \
    }

PROCESS_FUNCTIONS(ComputeRunningProcesses, KIND_COMPUTE)
PROCESS_FUNCTIONS(GraphicsRunningProcesses, KIND_GRAPHICS)
PROCESS_FUNCTIONS(MPSComputeRunningProcesses, KIND_MPS)

static nvmlReturn_t get_pci(const char *symbol, nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    ENTER_DEVICE(symbol, device);
    if (!pci)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    memset(pci, 0, sizeof *pci);
    pci->domain = d->pci_domain;
    pci->bus = d->pci_bus;
    pci->device = d->pci_device;
    pci->pciDeviceId = d->pci_device_id;
    pci->pciSubSystemId = PCI_SUBSYSTEM_ID;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT,
             d->pci_domain & 0xFFFFU, d->pci_bus, d->pci_device);
    snprintf(pci->busId, sizeof pci->busId, NVML_DEVICE_PCI_BUS_ID_FMT, d->pci_domain, d->pci_bus,
             d->pci_device);
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci) { return get_pci("nvmlDeviceGetPciInfo", device, pci); }
nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci) { return get_pci("nvmlDeviceGetPciInfo_v2", device, pci); }
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) { return get_pci("nvmlDeviceGetPciInfo_v3", device, pci); }

nvmlReturn_t nvmlDeviceGetPciInfoExt(nvmlDevice_t device, nvmlPciInfoExt_t *pci)
{
    ENTER_DEVICE("nvmlDeviceGetPciInfoExt", device);
    if (!pci)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (pci->version != nvmlPciInfoExt_v1)
        return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    pci->domain = d->pci_domain;
    pci->bus = d->pci_bus;
    pci->device = d->pci_device;
    pci->pciDeviceId = d->pci_device_id;
    pci->pciSubSystemId = PCI_SUBSYSTEM_ID;
    pci->baseClass = 0x03;  /* display controller */
    pci->subClass = 0x02;   /* 3D controller */
    snprintf(pci->busId, sizeof pci->busId, NVML_DEVICE_PCI_BUS_ID_FMT, d->pci_domain, d->pci_bus,
             d->pci_device);
    return leave(NVML_SUCCESS);
}

/* ---------------------------------------------------------------------------------------- */
/* Not NVML: lets tests compare pynvml's ctypes structs with the header's. */

size_t nvml_double_sizeof(const char *type_name)
{
#define SIZE(t)                           \
    if (strcmp(type_name, #t) == 0)       \
        return sizeof(t)
    if (!type_name)
        return 0;
    SIZE(nvmlProcessInfo_v1_t);
    SIZE(nvmlProcessInfo_v2_t);
    SIZE(nvmlProcessInfo_t);
    SIZE(nvmlMemory_t);
    SIZE(nvmlMemory_v2_t);
    SIZE(nvmlUtilization_t);
    SIZE(nvmlPciInfo_t);
    SIZE(nvmlPciInfoExt_v1_t);
    return 0;
#undef SIZE
}
