/*
 * nvmlsim.c - a scripted stand-in for libnvidia-ml.so.1, for tests and the demo.
 *
 * Built by monitor/nvmlsim.py and loaded by the real nvidia-ml-py
 * bindings through LD_LIBRARY_PATH.  Every answer comes from files in the
 * directory named by $FAKE_NVML_DIR, so a test can script GPUs, XID events,
 * lost GPUs, failing initialisation and hanging calls while a daemon runs:
 *
 *   gpus            one GPU per line, tab-separated key=value fields
 *   driver_version  string returned by nvmlSystemGetDriverVersion
 *   events          appended lines "bus_id<TAB>event_type_hex<TAB>event_data", optionally
 *                   followed by "<TAB>gpu_instance_id<TAB>compute_instance_id"
 *   hang            "function[<TAB>bus_id]": matching calls block until removed
 *   init_error      integer nvmlReturn_t that the nvmlInit* calls return
 *   crash           "function[<TAB>bus_id]": matching calls abort()
 *   calls           if it exists, every exported call appends its name
 *   mig             one MIG device per line, tab-separated key=value fields: bus_id (its GPU),
 *                   index (0..7, its MIG device index), uuid, gi, ci, gpu_slices,
 *                   compute_slices, memory_mib; read afresh on every MIG call, so a test
 *                   repartitions a GPU while a daemon runs (and appends a MIG config change
 *                   event to say so)
 *
 * Enumeration is fixed at initialisation, as the driver's library does it: a GPU that joins the
 * gpus file after the first nvmlInit (or leaves it and comes back) is invisible to the count and
 * the handle lookups until every nvmlInit has had its nvmlShutdown and NVML is initialised
 * again.  The attributes of the GPUs it enumerated, lost ones and events stay live.
 *
 * A gpus line also scripts what the telemetry calls answer (util_gpu=, power_mw=, ...), and
 * "unsupported=" lists functions that answer NOT_SUPPORTED for that GPU.
 *
 * All shared state sits behind one mutex, which is never held while a call
 * blocks in a hang or sleeps in nvmlEventSetWait, so one stuck GPU never
 * stalls another GPU's calls.
 */

/* Declare the unversioned symbols too (nvmlInit, nvmlDeviceGetCount, ...)
 * instead of letting the header rename them to their _v2/_v3 forms. */
#define NVML_NO_UNVERSIONED_FUNC_DEFS 1

#include <nvml.h>

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_SLOTS 256      /* distinct bus ids ever seen by one process */
#define MAX_REGS 256       /* device registrations per event set */
#define FIELD_LEN 128      /* longest string attribute (name, uuid) */
#define MAX_MIG 8          /* MIG devices per GPU (an A100 or H100 has at most 7) */
#define MIG_FILE_MAX 65536 /* the mig control file is read up to this size */
#define DEFAULT_DRIVER "550.54.15"
#define CUDA_DRIVER_VERSION 12040
#define HANG_POLL_NS (10 * 1000 * 1000L)
#define EVENT_POLL_NS (5 * 1000 * 1000L)

/* A PCI address reduced to numbers, so "0000:3b:00.0" and "00000000:3B:00.0" compare equal. */
typedef struct {
    unsigned int domain, bus, device, function;
} pci_addr_t;

/* One GPU.  Handles are pointers to these slots; a slot is bound to one bus id
 * for the life of the process, so a handle keeps naming the same GPU even if the
 * gpus file is reordered, and turns "lost" if its line disappears. */
struct nvmlDevice_st {
    int used;             /* slot bound to a bus id */
    pci_addr_t addr;      /* immutable once used is set (read without the lock) */
    int present;          /* listed in the current gpus file */
    int enumerated;       /* present at the last first-nvmlInit and ever since */
    unsigned int index;   /* line number in the gpus file */
    char uuid[FIELD_LEN];
    char name[FIELD_LEN];
    unsigned long long memory_mib, bar1_mib;
    unsigned int power_limit_mw, max_sm_clock_mhz, max_mem_clock_mhz;
    unsigned int pcie_max_gen, pcie_max_width;
    int cc_major, cc_minor;
    unsigned int persistence, display_mode, mig_mode, minor;
    int lost;
    int register_error;
    unsigned long long supported_events;
    unsigned int recovery_action;
    unsigned int pci_device_id, pci_subsystem_id;
    /* telemetry: what the stats calls answer */
    unsigned int util_gpu, util_memory, util_encoder, util_decoder;
    unsigned long long memory_used_mib, bar1_used_mib;
    unsigned int temperature_c, temperature_slowdown_c, power_mw;
    unsigned long long energy_mj;
    unsigned int sm_clock_mhz, mem_clock_mhz, pcie_tx_kbps, pcie_rx_kbps;
    unsigned long long ecc_volatile_corrected, ecc_volatile_uncorrected;
    unsigned long long ecc_aggregate_corrected, ecc_aggregate_uncorrected;
    unsigned long long ecc_l1, ecc_l2, ecc_dram;
    unsigned int retired_sbe, retired_dbe, retired_pending;
    unsigned int remapped_correctable, remapped_uncorrectable, remapped_pending, remapped_failed;
    unsigned long long throttle_reasons;
    unsigned int pcie_replays;         /* nvmlDeviceGetPcieReplayCounter */
    unsigned int nvlink_links;         /* links 0..n-1 exist; 0: no NVLink (NOT_SUPPORTED) */
    unsigned long long nvlink_down;    /* bit k: link k is inactive */
    char unsupported[1024]; /* comma-separated functions that answer NOT_SUPPORTED */
    unsigned int max_mig;   /* nvmlDeviceGetMaxMigDeviceCount */
    /* a MIG device handle (g_migs): its GPU, its index, and what the mig file says of it */
    struct nvmlDevice_st *parent;
    unsigned int mig_index, gi, ci, gpu_slices, compute_slices;
};

/* One device's interest in some event types, and where in the events file it began. */
typedef struct {
    struct nvmlDevice_st *dev;
    unsigned long long mask;
    long long start; /* events at file offsets before this are not for this registration */
} registration_t;

/* An event set: registrations plus how far into the events file it has read. */
struct nvmlEventSet_st {
    struct nvmlEventSet_st *next; /* list of live sets, to validate handles */
    long long offset;
    int nregs;
    registration_t regs[MAX_REGS];
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_init_count;                       /* nvmlInit minus nvmlShutdown calls */
static struct nvmlDevice_st g_slots[MAX_SLOTS];
static unsigned int g_count;                   /* GPUs enumerated and still in the file */
static struct nvmlDevice_st *g_order[MAX_SLOTS]; /* index -> slot, of those */
static struct stat g_gpus_stat;                /* identity of the gpus file last parsed */
static int g_gpus_loaded;
static struct nvmlEventSet_st *g_sets;
static struct nvmlDevice_st g_migs[MAX_SLOTS * MAX_MIG]; /* MIG handles: GPU slot x index */

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

/* Build the path of a control file, so every lookup honours $FAKE_NVML_DIR. */
static int control_path(const char *file, char *out, size_t size)
{
    const char *dir = getenv("FAKE_NVML_DIR");
    if (dir == NULL || *dir == '\0')
        return -1;
    int n = snprintf(out, size, "%s/%s", dir, file);
    return (n < 0 || (size_t)n >= size) ? -1 : 0;
}

/* Open a control file (close-on-exec); -1 if $FAKE_NVML_DIR is unset or open() fails. */
static int open_control(const char *file, int flags)
{
    char path[4096];
    if (control_path(file, path, sizeof path) != 0)
        return -1;
    return open(path, flags | O_CLOEXEC);
}

/* Read from fd until EOF, an error or size - 1 bytes, restarting after signals, and
 * NUL-terminate; returns the length read. */
static size_t read_all(int fd, char *buf, size_t size)
{
    size_t len = 0;
    while (len + 1 < size) {
        ssize_t n = read(fd, buf + len, size - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    buf[len] = '\0';
    return len;
}

/* Read a whole small control file; -1 if it does not exist.  The test writes
 * these atomically, so one read sees either the old or the new contents. */
static ssize_t read_control(const char *file, char *buf, size_t size)
{
    int fd = open_control(file, O_RDONLY);
    if (fd < 0)
        return -1;
    size_t len = read_all(fd, buf, size);
    close(fd);
    return (ssize_t)len;
}

/* Strip trailing whitespace in place, because control files are usually written with a newline. */
static void rstrip(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t'))
        s[--n] = '\0';
}

/* Parse "dddd:bb:dd.f", "dddddddd:bb:dd.f" or "bb:dd.f" in any case; 0 on success.
 * Tests give the kernel form, NVML callers give NVML's own form. */
static int parse_pci(const char *s, pci_addr_t *out)
{
    unsigned int a, b, c, d;
    char tail;
    if (sscanf(s, "%x:%x:%x.%x%c", &a, &b, &c, &d, &tail) == 4) {
        out->domain = a;
        out->bus = b;
        out->device = c;
        out->function = d;
        return 0;
    }
    if (sscanf(s, "%x:%x.%x%c", &b, &c, &d, &tail) == 3) {
        out->domain = 0;
        out->bus = b;
        out->device = c;
        out->function = d;
        return 0;
    }
    return -1;
}

/* Compare two PCI addresses, so differently spelled bus ids match. */
static int pci_equal(const pci_addr_t *a, const pci_addr_t *b)
{
    return a->domain == b->domain && a->bus == b->bus && a->device == b->device &&
           a->function == b->function;
}

/* Sleep for a few nanoseconds' worth of polling interval, restarting after signals. */
static void nap(long ns)
{
    struct timespec ts = {0, ns};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Monotonic milliseconds, for event-wait timeouts that ignore wall-clock jumps. */
static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Size of the events file (0 if absent), which is where new registrations start reading. */
static long long events_size(void)
{
    char path[4096];
    struct stat st;
    if (control_path("events", path, sizeof path) != 0 || stat(path, &st) != 0)
        return 0;
    return (long long)st.st_size;
}

/* Copy a string into a caller's buffer, failing like NVML when the buffer is too small. */
static nvmlReturn_t copy_out(char *dst, unsigned int size, const char *src)
{
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > size)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* The gpus file                                                             */
/* ------------------------------------------------------------------------ */

/* Find the slot bound to a PCI address, or bind a free one; NULL if all are taken. */
static struct nvmlDevice_st *slot_for(const pci_addr_t *addr, int create)
{
    for (int i = 0; i < MAX_SLOTS; i++)
        if (g_slots[i].used && pci_equal(&g_slots[i].addr, addr))
            return &g_slots[i];
    if (!create)
        return NULL;
    for (int i = 0; i < MAX_SLOTS; i++) {
        if (!g_slots[i].used) {
            g_slots[i].addr = *addr;
            g_slots[i].used = 1;
            return &g_slots[i];
        }
    }
    return NULL;
}

/* Reset a slot's attributes to an H100 SXM, so a gpus line only needs the keys it changes. */
static void set_defaults(struct nvmlDevice_st *d)
{
    snprintf(d->uuid, sizeof d->uuid, "GPU-00000000-0000-0000-0000-%012x", d->addr.bus);
    snprintf(d->name, sizeof d->name, "NVIDIA H100 80GB HBM3");
    d->memory_mib = 81559;
    d->bar1_mib = 131072;
    d->power_limit_mw = 700000;
    d->max_sm_clock_mhz = 1980;
    d->max_mem_clock_mhz = 2619;
    d->pcie_max_gen = 5;
    d->pcie_max_width = 16;
    d->cc_major = 9;
    d->cc_minor = 0;
    d->persistence = 1;
    d->display_mode = 0;
    d->mig_mode = 0;
    d->minor = 0;
    d->lost = 0;
    d->register_error = 0;
    d->supported_events = 0;
    d->recovery_action = 0;
    d->pci_device_id = 0x233010DE;
    d->pci_subsystem_id = 0x16C110DE;
    d->util_gpu = 0;
    d->util_memory = 0;
    d->util_encoder = 0;
    d->util_decoder = 0;
    d->memory_used_mib = 0;
    d->bar1_used_mib = 0;
    d->temperature_c = 30;
    d->temperature_slowdown_c = 87;
    d->power_mw = 70000;
    d->energy_mj = 0;
    d->sm_clock_mhz = 345;
    d->mem_clock_mhz = 2619;
    d->pcie_tx_kbps = 0;
    d->pcie_rx_kbps = 0;
    d->ecc_volatile_corrected = d->ecc_volatile_uncorrected = 0;
    d->ecc_aggregate_corrected = d->ecc_aggregate_uncorrected = 0;
    d->ecc_l1 = d->ecc_l2 = d->ecc_dram = 0;
    d->retired_sbe = d->retired_dbe = d->retired_pending = 0;
    d->remapped_correctable = d->remapped_uncorrectable = 0;
    d->remapped_pending = d->remapped_failed = 0;
    d->throttle_reasons = 0x1; /* idle */
    d->pcie_replays = 0;
    d->nvlink_links = 0;
    d->nvlink_down = 0;
    d->unsupported[0] = '\0';
    d->max_mig = 7;
}

/* Apply one key=value field to a slot; unknown keys are ignored so the format can grow. */
static void apply_field(struct nvmlDevice_st *d, const char *key, const char *val)
{
    unsigned long long dec = strtoull(val, NULL, 10);
    if (strcmp(key, "uuid") == 0)
        snprintf(d->uuid, sizeof d->uuid, "%s", val);
    else if (strcmp(key, "name") == 0)
        snprintf(d->name, sizeof d->name, "%s", val);
    else if (strcmp(key, "memory_mib") == 0)
        d->memory_mib = dec;
    else if (strcmp(key, "bar1_mib") == 0)
        d->bar1_mib = dec;
    else if (strcmp(key, "power_limit_mw") == 0)
        d->power_limit_mw = (unsigned int)dec;
    else if (strcmp(key, "max_sm_clock_mhz") == 0)
        d->max_sm_clock_mhz = (unsigned int)dec;
    else if (strcmp(key, "max_mem_clock_mhz") == 0)
        d->max_mem_clock_mhz = (unsigned int)dec;
    else if (strcmp(key, "pcie_max_gen") == 0)
        d->pcie_max_gen = (unsigned int)dec;
    else if (strcmp(key, "pcie_max_width") == 0)
        d->pcie_max_width = (unsigned int)dec;
    else if (strcmp(key, "cc_major") == 0)
        d->cc_major = (int)dec;
    else if (strcmp(key, "cc_minor") == 0)
        d->cc_minor = (int)dec;
    else if (strcmp(key, "persistence") == 0)
        d->persistence = (unsigned int)dec;
    else if (strcmp(key, "display_mode") == 0)
        d->display_mode = (unsigned int)dec;
    else if (strcmp(key, "mig_mode") == 0)
        d->mig_mode = (unsigned int)dec;
    else if (strcmp(key, "minor") == 0)
        d->minor = (unsigned int)dec;
    else if (strcmp(key, "lost") == 0)
        d->lost = dec != 0;
    else if (strcmp(key, "register_error") == 0)
        d->register_error = (int)dec;
    else if (strcmp(key, "supported_events") == 0)
        d->supported_events = strtoull(val, NULL, 16);
    else if (strcmp(key, "recovery_action") == 0)
        d->recovery_action = (unsigned int)dec;
    else if (strcmp(key, "pci_device_id") == 0)
        d->pci_device_id = (unsigned int)strtoull(val, NULL, 16);
    else if (strcmp(key, "pci_subsystem_id") == 0)
        d->pci_subsystem_id = (unsigned int)strtoull(val, NULL, 16);
    else if (strcmp(key, "util_gpu") == 0)
        d->util_gpu = (unsigned int)dec;
    else if (strcmp(key, "util_memory") == 0)
        d->util_memory = (unsigned int)dec;
    else if (strcmp(key, "util_encoder") == 0)
        d->util_encoder = (unsigned int)dec;
    else if (strcmp(key, "util_decoder") == 0)
        d->util_decoder = (unsigned int)dec;
    else if (strcmp(key, "temperature_c") == 0)
        d->temperature_c = (unsigned int)dec;
    else if (strcmp(key, "temperature_slowdown_c") == 0)
        d->temperature_slowdown_c = (unsigned int)dec;
    else if (strcmp(key, "power_mw") == 0)
        d->power_mw = (unsigned int)dec;
    else if (strcmp(key, "sm_clock_mhz") == 0)
        d->sm_clock_mhz = (unsigned int)dec;
    else if (strcmp(key, "mem_clock_mhz") == 0)
        d->mem_clock_mhz = (unsigned int)dec;
    else if (strcmp(key, "pcie_tx_kbps") == 0)
        d->pcie_tx_kbps = (unsigned int)dec;
    else if (strcmp(key, "pcie_rx_kbps") == 0)
        d->pcie_rx_kbps = (unsigned int)dec;
    else if (strcmp(key, "retired_sbe") == 0)
        d->retired_sbe = (unsigned int)dec;
    else if (strcmp(key, "retired_dbe") == 0)
        d->retired_dbe = (unsigned int)dec;
    else if (strcmp(key, "retired_pending") == 0)
        d->retired_pending = (unsigned int)dec;
    else if (strcmp(key, "remapped_correctable") == 0)
        d->remapped_correctable = (unsigned int)dec;
    else if (strcmp(key, "remapped_uncorrectable") == 0)
        d->remapped_uncorrectable = (unsigned int)dec;
    else if (strcmp(key, "remapped_pending") == 0)
        d->remapped_pending = (unsigned int)dec;
    else if (strcmp(key, "remapped_failed") == 0)
        d->remapped_failed = (unsigned int)dec;
    else if (strcmp(key, "memory_used_mib") == 0)
        d->memory_used_mib = dec;
    else if (strcmp(key, "bar1_used_mib") == 0)
        d->bar1_used_mib = dec;
    else if (strcmp(key, "energy_mj") == 0)
        d->energy_mj = dec;
    else if (strcmp(key, "ecc_volatile_corrected") == 0)
        d->ecc_volatile_corrected = dec;
    else if (strcmp(key, "ecc_volatile_uncorrected") == 0)
        d->ecc_volatile_uncorrected = dec;
    else if (strcmp(key, "ecc_aggregate_corrected") == 0)
        d->ecc_aggregate_corrected = dec;
    else if (strcmp(key, "ecc_aggregate_uncorrected") == 0)
        d->ecc_aggregate_uncorrected = dec;
    else if (strcmp(key, "ecc_l1") == 0)
        d->ecc_l1 = dec;
    else if (strcmp(key, "ecc_l2") == 0)
        d->ecc_l2 = dec;
    else if (strcmp(key, "ecc_dram") == 0)
        d->ecc_dram = dec;
    else if (strcmp(key, "throttle_reasons") == 0)
        d->throttle_reasons = strtoull(val, NULL, 16);
    else if (strcmp(key, "pcie_replays") == 0)
        d->pcie_replays = (unsigned int)dec;
    else if (strcmp(key, "nvlink_links") == 0)
        d->nvlink_links = (unsigned int)dec;
    else if (strcmp(key, "nvlink_down") == 0)
        d->nvlink_down = strtoull(val, NULL, 16);
    else if (strcmp(key, "unsupported") == 0)
        snprintf(d->unsupported, sizeof d->unsupported, "%s", val);
    else if (strcmp(key, "max_mig") == 0)
        d->max_mig = (unsigned int)dec;
}

/* Find a key's value in a tab-separated line (NUL-separated after splitting), or NULL. */
static const char *line_value(char **fields, int nfields, const char *key)
{
    size_t klen = strlen(key);
    for (int i = 0; i < nfields; i++)
        if (strncmp(fields[i], key, klen) == 0 && fields[i][klen] == '=')
            return fields[i] + klen + 1;
    return NULL;
}

/* The GPUs in the file's order as NVML's indices: only those enumerated at init count. */
static void number_gpus(struct nvmlDevice_st **lines, unsigned int nlines)
{
    g_count = 0;
    for (unsigned int i = 0; i < nlines; i++) {
        if (lines[i]->enumerated) {
            lines[i]->index = g_count;
            g_order[g_count++] = lines[i];
        }
    }
}

/* Parse the whole gpus file into the slots; called with the lock held. */
static void parse_gpus(char *text)
{
    static struct nvmlDevice_st *lines[MAX_SLOTS]; /* the file's GPUs in order */
    unsigned int nlines = 0;
    for (int i = 0; i < MAX_SLOTS; i++)
        g_slots[i].present = 0;
    char *save_line = NULL;
    for (char *line = strtok_r(text, "\n", &save_line); line != NULL;
         line = strtok_r(NULL, "\n", &save_line)) {
        char *fields[64];
        int nfields = 0;
        char *save_field = NULL;
        rstrip(line);
        for (char *f = strtok_r(line, "\t", &save_field); f != NULL && nfields < 64;
             f = strtok_r(NULL, "\t", &save_field))
            fields[nfields++] = f;
        const char *bus = line_value(fields, nfields, "bus_id");
        pci_addr_t addr;
        if (bus == NULL || parse_pci(bus, &addr) != 0)
            continue;
        struct nvmlDevice_st *d = slot_for(&addr, 1);
        if (d == NULL || d->present || nlines >= MAX_SLOTS)
            continue;
        set_defaults(d);
        for (int i = 0; i < nfields; i++) {
            char *eq = strchr(fields[i], '=');
            if (eq == NULL)
                continue;
            *eq = '\0';
            apply_field(d, fields[i], eq + 1);
            *eq = '=';
        }
        d->present = 1;
        lines[nlines++] = d;
    }
    /* A GPU that left the file is gone from this enumeration, even if it comes back. */
    for (int i = 0; i < MAX_SLOTS; i++)
        if (!g_slots[i].present)
            g_slots[i].enumerated = 0;
    number_gpus(lines, nlines);
}

/* Re-read the gpus file if it changed (inode, size or mtime), so tests can edit GPUs live.
 * Reads through the descriptor it fstat()ed, so a file replaced meanwhile is seen whole
 * on the next call.  Called with the lock held at the start of every API call. */
static void refresh_gpus(void)
{
    struct stat st;
    memset(&st, 0, sizeof st);
    int fd = open_control("gpus", O_RDONLY);
    if (fd >= 0 && fstat(fd, &st) != 0)
        memset(&st, 0, sizeof st);
    if (g_gpus_loaded && st.st_ino == g_gpus_stat.st_ino && st.st_size == g_gpus_stat.st_size &&
        st.st_mtim.tv_sec == g_gpus_stat.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == g_gpus_stat.st_mtim.tv_nsec) {
        if (fd >= 0)
            close(fd);
        return;
    }
    size_t cap = (size_t)st.st_size + 4096;
    char *text = malloc(cap);
    if (text == NULL) {
        if (fd >= 0)
            close(fd);
        return;
    }
    text[0] = '\0'; /* no gpus file: parse it as empty */
    if (fd >= 0) {
        read_all(fd, text, cap);
        close(fd);
    }
    parse_gpus(text);
    free(text);
    g_gpus_stat = st;
    g_gpus_loaded = 1;
}

/* ------------------------------------------------------------------------ */
/* Per-call prologue: call log, crash, hang, lock, init and handle checks     */
/* ------------------------------------------------------------------------ */

/* Append the function name to the calls file if the test asked for a call log.
 * One O_APPEND write per line keeps lines whole across threads and processes. */
static void record_call(const char *fn)
{
    char line[256];
    int fd = open_control("calls", O_WRONLY | O_APPEND);
    if (fd < 0)
        return;
    int n = snprintf(line, sizeof line, "%s\n", fn);
    if (n > 0 && write(fd, line, (size_t)n) < 0) {
        /* nothing useful to do: the call log is best effort */
    }
    close(fd);
}

/* True if a "function[<TAB>bus_id]" control file names this call (and device). */
static int control_matches(const char *file, const char *fn, const struct nvmlDevice_st *dev)
{
    char buf[512];
    if (read_control(file, buf, sizeof buf) < 0)
        return 0;
    rstrip(buf);
    char *tab = strchr(buf, '\t');
    if (tab != NULL)
        *tab++ = '\0';
    if (strcmp(buf, fn) != 0)
        return 0;
    if (tab == NULL || *tab == '\0')
        return 1;
    pci_addr_t want;
    if (dev == NULL || parse_pci(tab, &want) != 0)
        return 0;
    return pci_equal(&want, &dev->addr);
}

/* True if the pointer is one of our device slots, so bad handles never get dereferenced. */
static int valid_slot(nvmlDevice_t dev)
{
    uintptr_t p = (uintptr_t)dev, base = (uintptr_t)g_slots;
    if (p < base || p >= base + sizeof g_slots)
        return 0;
    return (p - base) % sizeof g_slots[0] == 0;
}

/* Run before anything else in every exported function: log the call, crash or
 * block if the test asked for it.  Runs without the lock, so a hang blocks only
 * this call.  dev may be NULL (or garbage) for calls that take no device. */
static void enter(const char *fn, nvmlDevice_t dev)
{
    const struct nvmlDevice_st *d = valid_slot(dev) ? dev : NULL;
    record_call(fn);
    if (control_matches("crash", fn, d))
        abort();
    while (control_matches("hang", fn, d))
        nap(HANG_POLL_NS);
}

/* Unlock and return rc, so every exit path of a locked section is a one-liner. */
static nvmlReturn_t unlock_with(nvmlReturn_t rc)
{
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Common start of every call: prologue (dev picks which crash/hang lines match; NULL
 * for calls without a device), lock, init check, gpus refresh.
 * Returns with the lock held on success, released on failure. */
static nvmlReturn_t begin(const char *fn, nvmlDevice_t dev)
{
    enter(fn, dev);
    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        return unlock_with(NVML_ERROR_UNINITIALIZED);
    refresh_gpus();
    return NVML_SUCCESS;
}

/* Common start of a per-device call: as begin(), plus handle validation and the
 * lost/removed check.  Returns with the lock held on success. */
static nvmlReturn_t dev_begin(const char *fn, nvmlDevice_t dev, struct nvmlDevice_st **out)
{
    nvmlReturn_t rc = begin(fn, dev);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!valid_slot(dev) || !dev->used)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    if (!dev->present || !dev->enumerated || dev->lost)
        return unlock_with(NVML_ERROR_GPU_IS_LOST);
    *out = dev;
    return NVML_SUCCESS;
}

/* The usual prologue of an exported function: begin(fn, NULL), then INVALID_ARGUMENT
 * if the output pointer ptr is NULL.  Macros rather than functions because they return
 * from the caller; fn is the caller's __func__, or the exported name a shared body got. */
#define CALL(fn, ptr)                                        \
    do {                                                     \
        nvmlReturn_t call_rc_ = begin(fn, NULL);             \
        if (call_rc_ != NVML_SUCCESS)                        \
            return call_rc_;                                 \
        if ((ptr) == NULL)                                   \
            return unlock_with(NVML_ERROR_INVALID_ARGUMENT); \
    } while (0)

/* As CALL(), for a per-device call: also declares d, the validated device. */
#define DEVICE_CALL(fn, device, d, ptr)                      \
    struct nvmlDevice_st *d;                                 \
    do {                                                     \
        nvmlReturn_t call_rc_ = dev_begin(fn, device, &d);   \
        if (call_rc_ != NVML_SUCCESS)                        \
            return call_rc_;                                 \
        if ((ptr) == NULL)                                   \
            return unlock_with(NVML_ERROR_INVALID_ARGUMENT); \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Initialisation and system queries                                         */
/* ------------------------------------------------------------------------ */

/* Shared body of the nvmlInit* variants: honour init_error, else count one more user. */
static nvmlReturn_t do_init(const char *fn)
{
    char buf[64];
    enter(fn, NULL);
    if (read_control("init_error", buf, sizeof buf) >= 0) {
        long code = strtol(buf, NULL, 10);
        if (code != 0)
            return (nvmlReturn_t)code;
    }
    pthread_mutex_lock(&g_lock);
    if (g_init_count++ == 0) {
        /* The first init enumerates: the GPUs in the file now, and no others until the next. */
        g_gpus_loaded = 0;
        for (int i = 0; i < MAX_SLOTS; i++)
            g_slots[i].enumerated = 1; /* kept by parse_gpus for those still present */
        refresh_gpus();
    }
    return unlock_with(NVML_SUCCESS);
}

/* The original init entry point, kept for old callers. */
nvmlReturn_t nvmlInit(void)
{
    return do_init(__func__);
}

/* The init entry point C callers get via the header's renaming. */
nvmlReturn_t nvmlInit_v2(void)
{
    return do_init(__func__);
}

/* The init entry point pynvml uses (nvmlInit() calls it with flags 0). */
nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return do_init(__func__);
}

/* Drop one reference taken by nvmlInit*, like NVML's ref-counted shutdown. */
nvmlReturn_t nvmlShutdown(void)
{
    enter(__func__, NULL);
    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        return unlock_with(NVML_ERROR_UNINITIALIZED);
    g_init_count--;
    return unlock_with(NVML_SUCCESS);
}

/* Text for a return code; pynvml calls this to describe codes it has no text for. */
const char *nvmlErrorString(nvmlReturn_t result)
{
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
    case NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: return "vGPU ECC not supported";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Insufficient resources";
    case NVML_ERROR_FREQ_NOT_SUPPORTED: return "Frequency not supported";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_DEPRECATED: return "Deprecated";
    case NVML_ERROR_NOT_READY: return "Not ready";
    case NVML_ERROR_GPU_NOT_FOUND: return "GPU not found";
    case NVML_ERROR_INVALID_STATE: return "Invalid state";
    case NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: return "Reset type not supported";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Unknown Error";
    }
}

/* Current driver version string: the driver_version file, or the default. */
static void driver_version(char *out, size_t size)
{
    if (read_control("driver_version", out, size) <= 0)
        snprintf(out, size, "%s", DEFAULT_DRIVER);
    rstrip(out);
}

/* Driver version, re-read each call so a test can simulate a driver upgrade. */
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    char buf[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
    CALL(__func__, version); /* copy_out() would reject NULL the same way */
    driver_version(buf, sizeof buf);
    return unlock_with(copy_out(version, length, buf));
}

/* NVML library version: "12." plus the driver version, like real NVML. */
nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    char drv[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE], buf[NVML_SYSTEM_NVML_VERSION_BUFFER_SIZE + 8];
    CALL(__func__, version);
    driver_version(drv, sizeof drv);
    snprintf(buf, sizeof buf, "12.%s", drv);
    return unlock_with(copy_out(version, length, buf));
}

/* Shared body of the CUDA driver API version symbols: 12.4, the only version this
 * stand-in claims. */
static nvmlReturn_t cuda_driver_version(const char *fn, int *cudaDriverVersion)
{
    CALL(fn, cudaDriverVersion);
    *cudaDriverVersion = CUDA_DRIVER_VERSION;
    return unlock_with(NVML_SUCCESS);
}

/* CUDA driver API version (12.4). */
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    return cuda_driver_version(__func__, cudaDriverVersion);
}

/* Same as nvmlSystemGetCudaDriverVersion; the _v2 symbol exists in real NVML too. */
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return cuda_driver_version(__func__, cudaDriverVersion);
}

/* ------------------------------------------------------------------------ */
/* Enumeration                                                               */
/* ------------------------------------------------------------------------ */

/* Shared body of the device-count symbols: lines in the gpus file, lost ones included. */
static nvmlReturn_t get_count(const char *fn, unsigned int *count)
{
    CALL(fn, count);
    *count = g_count;
    return unlock_with(NVML_SUCCESS);
}

/* Old device-count symbol. */
nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return get_count(__func__, deviceCount);
}

/* Device-count symbol pynvml uses. */
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    return get_count(__func__, deviceCount);
}

/* Hand out a slot as a handle; a lost GPU fails like NVML ("Unable to determine the
 * device handle ... GPU is lost").  Called with the lock held. */
static nvmlReturn_t hand_out(struct nvmlDevice_st *d, nvmlDevice_t *device)
{
    if (d->lost)
        return NVML_ERROR_GPU_IS_LOST;
    *device = d;
    return NVML_SUCCESS;
}

/* Shared body of the by-index lookups: index = line number in the gpus file. */
static nvmlReturn_t by_index(const char *fn, unsigned int index, nvmlDevice_t *device)
{
    CALL(fn, device);
    if (index >= g_count)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    return unlock_with(hand_out(g_order[index], device));
}

/* Old by-index lookup. */
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return by_index(__func__, index, device);
}

/* By-index lookup pynvml uses. */
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    return by_index(__func__, index, device);
}

/* Shared body of the by-bus-id lookups; accepts NVML's and the kernel's spelling. */
static nvmlReturn_t by_pci(const char *fn, const char *pciBusId, nvmlDevice_t *device)
{
    CALL(fn, device);
    pci_addr_t addr;
    if (pciBusId == NULL || parse_pci(pciBusId, &addr) != 0)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    struct nvmlDevice_st *d = slot_for(&addr, 0);
    if (d == NULL || !d->present || !d->enumerated)
        return unlock_with(NVML_ERROR_NOT_FOUND);
    return unlock_with(hand_out(d, device));
}

/* Old by-bus-id lookup. */
nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *pciBusId, nvmlDevice_t *device)
{
    return by_pci(__func__, pciBusId, device);
}

/* By-bus-id lookup pynvml uses. */
nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    return by_pci(__func__, pciBusId, device);
}

/* Look a GPU up by its UUID string. */
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    CALL(__func__, device);
    if (uuid == NULL)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    for (unsigned int i = 0; i < g_count; i++)
        if (strcmp(g_order[i]->uuid, uuid) == 0)
            return unlock_with(hand_out(g_order[i], device));
    return unlock_with(NVML_ERROR_NOT_FOUND);
}

/* NVML index of a handle: its current line in the gpus file. */
nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    DEVICE_CALL(__func__, device, d, index);
    *index = d->index;
    return unlock_with(NVML_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* Identity                                                                  */
/* ------------------------------------------------------------------------ */

/* Set the fields nvmlPciInfo_t and nvmlPciInfoExt_t share (8-digit uppercase busId).
 * A macro because the two are distinct struct types with these fields at different offsets. */
#define SET_PCI_IDS(pci, d)                                                                   \
    do {                                                                                      \
        (pci)->domain = (d)->addr.domain;                                                     \
        (pci)->bus = (d)->addr.bus;                                                           \
        (pci)->device = (d)->addr.device;                                                     \
        (pci)->pciDeviceId = (d)->pci_device_id;                                              \
        (pci)->pciSubSystemId = (d)->pci_subsystem_id;                                        \
        snprintf((pci)->busId, sizeof (pci)->busId, NVML_DEVICE_PCI_BUS_ID_FMT,               \
                 (d)->addr.domain, (d)->addr.bus & 0xFF, (d)->addr.device & 0xFF);            \
    } while (0)

/* Fill nvmlPciInfo_t the way NVML does: 8-digit uppercase busId, 4-digit busIdLegacy. */
static void fill_pci(const struct nvmlDevice_st *d, nvmlPciInfo_t *pci)
{
    memset(pci, 0, sizeof *pci);
    SET_PCI_IDS(pci, d);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT,
             d->addr.domain & 0xFFFF, d->addr.bus & 0xFF, d->addr.device & 0xFF);
}

/* Shared body of every nvmlPciInfo_t symbol (they share one struct layout in this header). */
static nvmlReturn_t get_pci(const char *fn, nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    DEVICE_CALL(fn, device, d, pci);
    fill_pci(d, pci);
    return unlock_with(NVML_SUCCESS);
}

/* Oldest PCI-info symbol. */
nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return get_pci(__func__, device, pci);
}

/* Second PCI-info symbol. */
nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return get_pci(__func__, device, pci);
}

/* PCI-info symbol pynvml's nvmlDeviceGetPciInfo uses. */
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return get_pci(__func__, device, pci);
}

/* Versioned PCI info with class codes (a 3D controller, like data-centre GPUs). */
nvmlReturn_t nvmlDeviceGetPciInfoExt(nvmlDevice_t device, nvmlPciInfoExt_t *pci)
{
    DEVICE_CALL(__func__, device, d, pci);
    if (pci->version != nvmlPciInfoExt_v1)
        return unlock_with(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    SET_PCI_IDS(pci, d);
    pci->baseClass = 0x03;
    pci->subClass = 0x02;
    return unlock_with(NVML_SUCCESS);
}

/* GPU UUID string ("GPU-...") from the gpus file. */
static nvmlReturn_t mig_uuid(nvmlDevice_t device, char *uuid, unsigned int length);
static int valid_mig(nvmlDevice_t dev);

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    if (valid_mig(device))
        return mig_uuid(device, uuid, length); /* "MIG-..." */
    DEVICE_CALL(__func__, device, d, uuid);
    return unlock_with(copy_out(uuid, length, d->uuid));
}

/* Marketing name from the gpus file. */
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    DEVICE_CALL(__func__, device, d, name);
    return unlock_with(copy_out(name, length, d->name));
}

/* The N of /dev/nvidiaN. */
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    DEVICE_CALL(__func__, device, d, minorNumber);
    *minorNumber = d->minor;
    return unlock_with(NVML_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* Memory, power, clocks, PCIe, capabilities, modes                          */
/* ------------------------------------------------------------------------ */

/* Framebuffer size and use in bytes, from memory_mib and memory_used_mib. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    DEVICE_CALL(__func__, device, d, memory);
    memory->total = d->memory_mib << 20;
    memory->used = d->memory_used_mib << 20;
    memory->free = memory->total - memory->used;
    return unlock_with(NVML_SUCCESS);
}

/* Versioned framebuffer info (pynvml uses it when given version=nvmlMemory_v2). */
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    DEVICE_CALL(__func__, device, d, memory);
    if (memory->version != nvmlMemory_v2)
        return unlock_with(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory->total = d->memory_mib << 20;
    memory->reserved = 0;
    memory->used = d->memory_used_mib << 20;
    memory->free = memory->total - memory->used;
    return unlock_with(NVML_SUCCESS);
}

/* BAR1 aperture size and use in bytes. */
nvmlReturn_t nvmlDeviceGetBAR1MemoryInfo(nvmlDevice_t device, nvmlBAR1Memory_t *bar1Memory)
{
    DEVICE_CALL(__func__, device, d, bar1Memory);
    bar1Memory->bar1Total = d->bar1_mib << 20;
    bar1Memory->bar1Used = d->bar1_used_mib << 20;
    bar1Memory->bar1Free = bar1Memory->bar1Total - bar1Memory->bar1Used;
    return unlock_with(NVML_SUCCESS);
}

/* Shared body of the two power-limit queries (milliwatts); the fake enforces what it sets. */
static nvmlReturn_t power_limit(const char *fn, nvmlDevice_t device, unsigned int *limit)
{
    DEVICE_CALL(fn, device, d, limit);
    *limit = d->power_limit_mw;
    return unlock_with(NVML_SUCCESS);
}

/* Configured power limit in mW. */
nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit(__func__, device, limit);
}

/* Enforced power limit in mW (equal to the configured one here). */
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit(__func__, device, limit);
}

/* Maximum clocks in MHz: graphics and SM share max_sm_clock; memory uses max_mem_clock. */
nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, nvmlClockType_t type,
                                       unsigned int *clock)
{
    DEVICE_CALL(__func__, device, d, clock);
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM:
        *clock = d->max_sm_clock_mhz;
        break;
    case NVML_CLOCK_MEM:
        *clock = d->max_mem_clock_mhz;
        break;
    case NVML_CLOCK_VIDEO:
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    default:
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    }
    return unlock_with(NVML_SUCCESS);
}

/* Highest PCIe generation the GPU and slot support. */
nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(nvmlDevice_t device, unsigned int *maxLinkGen)
{
    DEVICE_CALL(__func__, device, d, maxLinkGen);
    *maxLinkGen = d->pcie_max_gen;
    return unlock_with(NVML_SUCCESS);
}

/* Widest PCIe link (lanes). */
nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(nvmlDevice_t device, unsigned int *maxLinkWidth)
{
    DEVICE_CALL(__func__, device, d, maxLinkWidth);
    *maxLinkWidth = d->pcie_max_width;
    return unlock_with(NVML_SUCCESS);
}

/* Per-lane PCIe speed in MB/s for the max generation (the header's NVML_PCIE_LINK_MAX_SPEED_*
 * names: gen1 2500 ... gen6 64000). */
nvmlReturn_t nvmlDeviceGetPcieLinkMaxSpeed(nvmlDevice_t device, unsigned int *maxSpeed)
{
    static const unsigned int speeds[] = {0, 2500, 5000, 8000, 16000, 32000, 64000};
    DEVICE_CALL(__func__, device, d, maxSpeed);
    if (d->pcie_max_gen == 0 || d->pcie_max_gen >= sizeof speeds / sizeof speeds[0])
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    *maxSpeed = speeds[d->pcie_max_gen];
    return unlock_with(NVML_SUCCESS);
}

/* CUDA compute capability (9.0 for an H100). */
nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    DEVICE_CALL(__func__, device, d, major);
    if (minor == NULL)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    *major = d->cc_major;
    *minor = d->cc_minor;
    return unlock_with(NVML_SUCCESS);
}

/* Shared body of the enable-state queries, which differ only in the attribute read. */
static nvmlReturn_t enable_state(const char *fn, nvmlDevice_t device, size_t field_offset,
                                 nvmlEnableState_t *mode)
{
    DEVICE_CALL(fn, device, d, mode);
    unsigned int value = *(const unsigned int *)((const char *)d + field_offset);
    *mode = value ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    return unlock_with(NVML_SUCCESS);
}

/* Persistence mode from the gpus file. */
nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, nvmlEnableState_t *mode)
{
    return enable_state(__func__, device, offsetof(struct nvmlDevice_st, persistence), mode);
}

/* Display mode (a monitor could be attached) from the gpus file. */
nvmlReturn_t nvmlDeviceGetDisplayMode(nvmlDevice_t device, nvmlEnableState_t *display)
{
    return enable_state(__func__, device, offsetof(struct nvmlDevice_st, display_mode), display);
}

/* Display active; follows display_mode, since the fake has no monitors. */
nvmlReturn_t nvmlDeviceGetDisplayActive(nvmlDevice_t device, nvmlEnableState_t *isActive)
{
    return enable_state(__func__, device, offsetof(struct nvmlDevice_st, display_mode), isActive);
}

/* MIG mode; the pending mode always equals the current one. */
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                  unsigned int *pendingMode)
{
    DEVICE_CALL(__func__, device, d, currentMode);
    if (pendingMode == NULL)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    *currentMode = d->mig_mode;
    *pendingMode = d->mig_mode;
    return unlock_with(NVML_SUCCESS);
}

/* Field values: only NVML_FI_DEV_GET_GPU_RECOVERY_ACTION is known; other fields fail
 * one by one with NOT_SUPPORTED while the call itself succeeds, as NVML does. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount,
                                      nvmlFieldValue_t *values)
{
    DEVICE_CALL(__func__, device, d, values);
    if (valuesCount < 0)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    for (int i = 0; i < valuesCount; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = (long long)tv.tv_sec * 1000000 + tv.tv_usec;
        v->latencyUsec = 0;
        if (v->fieldId == NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) {
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->value.uiVal = d->recovery_action;
            v->nvmlReturn = NVML_SUCCESS;
        } else {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        }
    }
    return unlock_with(NVML_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* Events                                                                    */
/* ------------------------------------------------------------------------ */

/* Event types this GPU can report, from its supported_events mask. */
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    DEVICE_CALL(__func__, device, d, eventTypes);
    *eventTypes = d->supported_events;
    return unlock_with(NVML_SUCCESS);
}

/* True if set is a live event set; checked under the lock before any dereference. */
static int valid_set(nvmlEventSet_t set)
{
    for (struct nvmlEventSet_st *s = g_sets; s != NULL; s = s->next)
        if (s == set)
            return 1;
    return 0;
}

/* New empty event set that will read the events file from its current end. */
nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    CALL(__func__, set);
    struct nvmlEventSet_st *s = calloc(1, sizeof *s);
    if (s == NULL)
        return unlock_with(NVML_ERROR_MEMORY);
    s->offset = events_size();
    s->next = g_sets;
    g_sets = s;
    *set = s;
    return unlock_with(NVML_SUCCESS);
}

/* Add a device's event types to a set.  Fails with the GPU's register_error if the test set
 * one, or NOT_SUPPORTED for types outside supported_events.  Only events appended after this
 * call are delivered for the device. */
nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                      nvmlEventSet_t set)
{
    DEVICE_CALL(__func__, device, d, set); /* valid_set() rejects NULL anyway */
    if (!valid_set(set))
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    if (d->register_error != 0)
        return unlock_with((nvmlReturn_t)d->register_error);
    if (eventTypes == 0 || (eventTypes & ~d->supported_events) != 0)
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    for (int i = 0; i < set->nregs; i++) {
        if (set->regs[i].dev == d) {
            set->regs[i].mask |= eventTypes;
            return unlock_with(NVML_SUCCESS);
        }
    }
    if (set->nregs >= MAX_REGS)
        return unlock_with(NVML_ERROR_INSUFFICIENT_RESOURCES);
    registration_t *r = &set->regs[set->nregs++];
    r->dev = d;
    r->mask = eventTypes;
    r->start = events_size();
    return unlock_with(NVML_SUCCESS);
}

/* Consume complete lines of the events file past set->offset until one matches a
 * registration; 1 and *data filled if one did.  Called with the lock held. */
static int next_event(struct nvmlEventSet_st *set, nvmlEventData_t *data)
{
    char path[4096], line[512];
    if (control_path("events", path, sizeof path) != 0)
        return 0;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && (long long)st.st_size < set->offset) {
        /* the file was truncated or replaced: start over from its beginning */
        set->offset = 0;
        for (int i = 0; i < set->nregs; i++)
            set->regs[i].start = 0;
    }
    int found = 0;
    if (fseeko(f, (off_t)set->offset, SEEK_SET) == 0) {
        while (!found && fgets(line, sizeof line, f) != NULL) {
            size_t len = strlen(line);
            if (len == 0 || line[len - 1] != '\n')
                break; /* a line still being written: leave it for the next poll */
            long long at = set->offset;
            set->offset += (long long)len;
            rstrip(line);
            char *save = NULL;
            char *bus = strtok_r(line, "\t", &save);
            char *type = strtok_r(NULL, "\t", &save);
            char *value = strtok_r(NULL, "\t", &save);
            char *gi = strtok_r(NULL, "\t", &save);
            char *ci = strtok_r(NULL, "\t", &save);
            pci_addr_t addr;
            if (bus == NULL || type == NULL || parse_pci(bus, &addr) != 0)
                continue;
            unsigned long long etype = strtoull(type, NULL, 16);
            for (int i = 0; i < set->nregs; i++) {
                registration_t *r = &set->regs[i];
                if (!pci_equal(&r->dev->addr, &addr) || !(r->mask & etype) || at < r->start)
                    continue;
                data->device = r->dev;
                data->eventType = etype;
                data->eventData = value ? strtoull(value, NULL, 0) : 0;
                data->gpuInstanceId = gi ? (unsigned int)strtoul(gi, NULL, 0) : 0xFFFFFFFFu;
                data->computeInstanceId = ci ? (unsigned int)strtoul(ci, NULL, 0) : 0xFFFFFFFFu;
                found = 1;
                break;
            }
        }
    }
    fclose(f);
    return found;
}

/* Shared body of both wait symbols: poll the events file every ~5 ms, never holding the lock
 * while sleeping, until a registered event arrives or timeoutms passes. */
static nvmlReturn_t event_wait(const char *fn, nvmlEventSet_t set, nvmlEventData_t *data,
                               unsigned int timeoutms)
{
    CALL(fn, data);
    if (!valid_set(set))
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    pthread_mutex_unlock(&g_lock);
    long long deadline = now_ms() + timeoutms;
    for (;;) {
        pthread_mutex_lock(&g_lock);
        if (g_init_count == 0)
            return unlock_with(NVML_ERROR_UNINITIALIZED);
        if (!valid_set(set))
            return unlock_with(NVML_ERROR_INVALID_ARGUMENT); /* freed while we waited */
        if (next_event(set, data))
            return unlock_with(NVML_SUCCESS);
        pthread_mutex_unlock(&g_lock);
        if (now_ms() >= deadline)
            return NVML_ERROR_TIMEOUT;
        nap(EVENT_POLL_NS);
    }
}

/* Old wait symbol (same data layout in this header). */
nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    return event_wait(__func__, set, data, timeoutms);
}

/* Wait symbol pynvml uses for both nvmlEventSetWait and nvmlEventSetWait_v2. */
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                 unsigned int timeoutms)
{
    return event_wait(__func__, set, data, timeoutms);
}

/* Destroy an event set; waiters on it notice and return INVALID_ARGUMENT. */
nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    CALL(__func__, set); /* NULL is never in the list, so it fails the same way below */
    for (struct nvmlEventSet_st **p = &g_sets; *p != NULL; p = &(*p)->next) {
        if (*p == set) {
            *p = set->next;
            free(set);
            return unlock_with(NVML_SUCCESS);
        }
    }
    return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
}

/* ------------------------------------------------------------------------ */
/* Telemetry: the values of the gpus file's telemetry keys                   */
/* ------------------------------------------------------------------------ */

/* True if the GPU's "unsupported" list names fn (comma-separated, whole names). */
static int unsupported(const struct nvmlDevice_st *d, const char *fn)
{
    size_t n = strlen(fn);
    for (const char *p = d->unsupported; *p != '\0';) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, fn, n) == 0)
            return 1;
        if (end == NULL)
            break;
        p = end + 1;
    }
    return 0;
}

/* As DEVICE_CALL, then NOT_SUPPORTED if the GPU's unsupported list names the function. */
#define STATS_CALL(fn, device, d, ptr)                           \
    DEVICE_CALL(fn, device, d, ptr);                             \
    do {                                                         \
        if (unsupported(d, fn))                                  \
            return unlock_with(NVML_ERROR_NOT_SUPPORTED);        \
    } while (0)

/* GPU and memory utilization, percent. */
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    STATS_CALL(__func__, device, d, utilization);
    utilization->gpu = d->util_gpu;
    utilization->memory = d->util_memory;
    return unlock_with(NVML_SUCCESS);
}

/* Shared body of the encoder and decoder utilization queries. */
static nvmlReturn_t codec_utilization(const char *fn, nvmlDevice_t device, unsigned int value_offset,
                                      unsigned int *utilization, unsigned int *samplingPeriodUs)
{
    STATS_CALL(fn, device, d, utilization);
    if (samplingPeriodUs == NULL)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    *utilization = *(const unsigned int *)((const char *)d + value_offset);
    *samplingPeriodUs = 167000;
    return unlock_with(NVML_SUCCESS);
}

/* Video encoder utilization, percent. */
nvmlReturn_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *samplingPeriodUs)
{
    return codec_utilization(__func__, device, offsetof(struct nvmlDevice_st, util_encoder),
                             utilization, samplingPeriodUs);
}

/* Video decoder utilization, percent. */
nvmlReturn_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *samplingPeriodUs)
{
    return codec_utilization(__func__, device, offsetof(struct nvmlDevice_st, util_decoder),
                             utilization, samplingPeriodUs);
}

/* GPU core temperature, degrees C. */
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType,
                                      unsigned int *temp)
{
    STATS_CALL(__func__, device, d, temp);
    if (sensorType != NVML_TEMPERATURE_GPU)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    *temp = d->temperature_c;
    return unlock_with(NVML_SUCCESS);
}

/* Temperature thresholds: slowdown (and, a few degrees above it, shutdown). */
nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device,
                                               nvmlTemperatureThresholds_t thresholdType,
                                               unsigned int *temp)
{
    STATS_CALL(__func__, device, d, temp);
    if (thresholdType == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
        *temp = d->temperature_slowdown_c;
    else if (thresholdType == NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
        *temp = d->temperature_slowdown_c + 5;
    else
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    return unlock_with(NVML_SUCCESS);
}

/* Power draw, milliwatts. */
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    STATS_CALL(__func__, device, d, power);
    *power = d->power_mw;
    return unlock_with(NVML_SUCCESS);
}

/* Energy since the driver was loaded, millijoules. */
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    STATS_CALL(__func__, device, d, energy);
    *energy = d->energy_mj;
    return unlock_with(NVML_SUCCESS);
}

/* Current clocks, MHz. */
nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock)
{
    STATS_CALL(__func__, device, d, clock);
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM:
        *clock = d->sm_clock_mhz;
        break;
    case NVML_CLOCK_MEM:
        *clock = d->mem_clock_mhz;
        break;
    default:
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    }
    return unlock_with(NVML_SUCCESS);
}

/* PCIe throughput over the last 20 ms, KB/s. */
nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t device, nvmlPcieUtilCounter_t counter,
                                         unsigned int *value)
{
    STATS_CALL(__func__, device, d, value);
    if (counter == NVML_PCIE_UTIL_TX_BYTES)
        *value = d->pcie_tx_kbps;
    else if (counter == NVML_PCIE_UTIL_RX_BYTES)
        *value = d->pcie_rx_kbps;
    else
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    return unlock_with(NVML_SUCCESS);
}

/* ECC error totals by type (corrected, uncorrected) and counter (volatile, aggregate). */
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                         nvmlEccCounterType_t counterType,
                                         unsigned long long *eccCounts)
{
    STATS_CALL(__func__, device, d, eccCounts);
    int corrected = errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED;
    if (counterType == NVML_VOLATILE_ECC)
        *eccCounts = corrected ? d->ecc_volatile_corrected : d->ecc_volatile_uncorrected;
    else if (counterType == NVML_AGGREGATE_ECC)
        *eccCounts = corrected ? d->ecc_aggregate_corrected : d->ecc_aggregate_uncorrected;
    else
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    return unlock_with(NVML_SUCCESS);
}

/* ECC errors by location: the uncorrected volatile counts of L1, L2 and device memory; every
 * other combination reads 0. */
nvmlReturn_t nvmlDeviceGetMemoryErrorCounter(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                             nvmlEccCounterType_t counterType,
                                             nvmlMemoryLocation_t locationType,
                                             unsigned long long *count)
{
    STATS_CALL(__func__, device, d, count);
    *count = 0;
    if (errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED && counterType == NVML_VOLATILE_ECC) {
        if (locationType == NVML_MEMORY_LOCATION_L1_CACHE)
            *count = d->ecc_l1;
        else if (locationType == NVML_MEMORY_LOCATION_L2_CACHE)
            *count = d->ecc_l2;
        else if (locationType == NVML_MEMORY_LOCATION_DEVICE_MEMORY) /* = DRAM */
            *count = d->ecc_dram;
    }
    return unlock_with(NVML_SUCCESS);
}

/* Retired pages by cause, as NVML does: the count, and the addresses if there is room. */
nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t device, nvmlPageRetirementCause_t cause,
                                       unsigned int *pageCount, unsigned long long *addresses)
{
    STATS_CALL(__func__, device, d, pageCount);
    unsigned int have = cause == NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR ? d->retired_dbe
                                                                                 : d->retired_sbe;
    if (addresses == NULL || *pageCount < have) {
        unsigned int asked = *pageCount;
        *pageCount = have;
        return unlock_with(asked < have || (addresses == NULL && have > 0)
                               ? NVML_ERROR_INSUFFICIENT_SIZE
                               : NVML_SUCCESS);
    }
    for (unsigned int i = 0; i < have; i++)
        addresses[i] = 0x1000ull * (i + 1);
    *pageCount = have;
    return unlock_with(NVML_SUCCESS);
}

/* Whether retired pages wait for the next reset. */
nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device,
                                                    nvmlEnableState_t *isPending)
{
    STATS_CALL(__func__, device, d, isPending);
    *isPending = d->retired_pending ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    return unlock_with(NVML_SUCCESS);
}

/* Row remapping (Ampere and later): counts, and whether one is pending or failed. */
nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows,
                                       unsigned int *uncRows, unsigned int *isPending,
                                       unsigned int *failureOccurred)
{
    STATS_CALL(__func__, device, d, corrRows);
    if (uncRows == NULL || isPending == NULL || failureOccurred == NULL)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    *corrRows = d->remapped_correctable;
    *uncRows = d->remapped_uncorrectable;
    *isPending = d->remapped_pending;
    *failureOccurred = d->remapped_failed;
    return unlock_with(NVML_SUCCESS);
}

/* Why the clocks are held down: NVML's reason bits. */
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                    unsigned long long *clocksEventReasons)
{
    STATS_CALL(__func__, device, d, clocksEventReasons);
    *clocksEventReasons = d->throttle_reasons;
    return unlock_with(NVML_SUCCESS);
}

/* The older name of the same query. */
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                       unsigned long long *clocksThrottleReasons)
{
    STATS_CALL(__func__, device, d, clocksThrottleReasons);
    *clocksThrottleReasons = d->throttle_reasons;
    return unlock_with(NVML_SUCCESS);
}

/* PCIe replays since the driver loaded. */
nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t device, unsigned int *value)
{
    STATS_CALL(__func__, device, d, value);
    *value = d->pcie_replays;
    return unlock_with(NVML_SUCCESS);
}

/* Whether an NVLink is active: NOT_SUPPORTED on a GPU without NVLink, INVALID_ARGUMENT for a
 * link index the GPU does not have, as NVML answers. */
nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link,
                                      nvmlEnableState_t *isActive)
{
    STATS_CALL(__func__, device, d, isActive);
    if (d->nvlink_links == 0)
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    if (link >= d->nvlink_links || link >= NVML_NVLINK_MAX_LINKS)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    *isActive = (link < 64 && (d->nvlink_down >> link) & 1) ? NVML_FEATURE_DISABLED
                                                            : NVML_FEATURE_ENABLED;
    return unlock_with(NVML_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* MIG: the devices of a GPU in MIG mode, from the mig file                  */
/* ------------------------------------------------------------------------ */

/* True if the pointer is one of our MIG handles. */
static int valid_mig(nvmlDevice_t dev)
{
    uintptr_t p = (uintptr_t)dev, base = (uintptr_t)g_migs;
    if (p < base || p >= base + sizeof g_migs)
        return 0;
    return (p - base) % sizeof g_migs[0] == 0;
}

/* Fill m from the mig file's line for (its parent GPU, index); 1 if the line is there.
 * Called with the lock held. */
static int read_mig(struct nvmlDevice_st *m)
{
    static char text[MIG_FILE_MAX];
    if (read_control("mig", text, sizeof text) < 0)
        return 0;
    char *save_line = NULL;
    for (char *line = strtok_r(text, "\n", &save_line); line != NULL;
         line = strtok_r(NULL, "\n", &save_line)) {
        char *fields[16];
        int nfields = 0;
        char *save_field = NULL;
        rstrip(line);
        for (char *f = strtok_r(line, "\t", &save_field); f != NULL && nfields < 16;
             f = strtok_r(NULL, "\t", &save_field))
            fields[nfields++] = f;
        const char *bus = line_value(fields, nfields, "bus_id");
        const char *index = line_value(fields, nfields, "index");
        pci_addr_t addr;
        if (bus == NULL || index == NULL || parse_pci(bus, &addr) != 0)
            continue;
        if (!pci_equal(&addr, &m->parent->addr) || strtoul(index, NULL, 10) != m->mig_index)
            continue;
        const char *v;
        snprintf(m->uuid, sizeof m->uuid, "%s", (v = line_value(fields, nfields, "uuid")) ? v : "");
        m->gi = (v = line_value(fields, nfields, "gi")) ? (unsigned int)strtoul(v, NULL, 10) : 0;
        m->ci = (v = line_value(fields, nfields, "ci")) ? (unsigned int)strtoul(v, NULL, 10) : 0;
        v = line_value(fields, nfields, "gpu_slices");
        m->gpu_slices = v ? (unsigned int)strtoul(v, NULL, 10) : 1;
        v = line_value(fields, nfields, "compute_slices");
        m->compute_slices = v ? (unsigned int)strtoul(v, NULL, 10) : m->gpu_slices;
        v = line_value(fields, nfields, "memory_mib");
        m->memory_mib = v ? strtoull(v, NULL, 10) : 0;
        return 1;
    }
    return 0;
}

/* Common start of a call on a MIG handle: as dev_begin(), for the handle's GPU, and the MIG
 * device must still be in the mig file (a destroyed one's handle is invalid, as NVML says). */
static nvmlReturn_t mig_begin(const char *fn, nvmlDevice_t dev, struct nvmlDevice_st **out)
{
    nvmlReturn_t rc = begin(fn, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!valid_mig(dev) || dev->parent == NULL)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    struct nvmlDevice_st *gpu = dev->parent;
    if (!gpu->present || !gpu->enumerated || gpu->lost)
        return unlock_with(NVML_ERROR_GPU_IS_LOST);
    if (!gpu->mig_mode || !read_mig(dev))
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    *out = dev;
    return NVML_SUCCESS;
}

/* As MIG handle calls begin: declares m, the MIG device, or returns the failure. */
#define MIG_CALL(fn, device, m, ptr)                         \
    struct nvmlDevice_st *m;                                 \
    do {                                                     \
        nvmlReturn_t call_rc_ = mig_begin(fn, device, &m);   \
        if (call_rc_ != NVML_SUCCESS)                        \
            return call_rc_;                                 \
        if ((ptr) == NULL)                                   \
            return unlock_with(NVML_ERROR_INVALID_ARGUMENT); \
    } while (0)

static nvmlReturn_t mig_uuid(nvmlDevice_t device, char *uuid, unsigned int length)
{
    MIG_CALL("nvmlDeviceGetUUID", device, m, uuid);
    return unlock_with(copy_out(uuid, length, m->uuid));
}

/* How many MIG devices the GPU can have (max_mig, 7 by default). */
nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    DEVICE_CALL(__func__, device, d, count);
    if (unsupported(d, __func__))
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    *count = d->max_mig;
    return unlock_with(NVML_SUCCESS);
}

/* The MIG device at index: NOT_FOUND where the mig file has none (or MIG mode is off). */
nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *migDevice)
{
    DEVICE_CALL(__func__, device, d, migDevice);
    if (unsupported(d, __func__))
        return unlock_with(NVML_ERROR_NOT_SUPPORTED);
    if (index >= MAX_MIG || index >= d->max_mig)
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    struct nvmlDevice_st *m = &g_migs[(size_t)(d - g_slots) * MAX_MIG + index];
    m->parent = d;
    m->mig_index = index;
    if (!d->mig_mode || !read_mig(m))
        return unlock_with(NVML_ERROR_NOT_FOUND);
    m->used = 1;
    m->addr = d->addr;
    *migDevice = m;
    return unlock_with(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    CALL(__func__, isMigDevice);
    if (valid_mig(device) && device->parent != NULL)
        *isMigDevice = 1;
    else if (valid_slot(device) && device->used)
        *isMigDevice = 0;
    else
        return unlock_with(NVML_ERROR_INVALID_ARGUMENT);
    return unlock_with(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                          nvmlDevice_t *device)
{
    MIG_CALL(__func__, migDevice, m, device);
    *device = m->parent;
    return unlock_with(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    MIG_CALL(__func__, device, m, id);
    *id = m->gi;
    return unlock_with(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    MIG_CALL(__func__, device, m, id);
    *id = m->ci;
    return unlock_with(NVML_SUCCESS);
}

/* A MIG device's slices and memory; a whole GPU's memory, with no slices. */
nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes)
{
    if (!valid_mig(device)) {
        DEVICE_CALL(__func__, device, d, attributes);
        memset(attributes, 0, sizeof *attributes);
        attributes->multiprocessorCount = 132;
        attributes->memorySizeMB = d->memory_mib;
        return unlock_with(NVML_SUCCESS);
    }
    MIG_CALL(__func__, device, m, attributes);
    memset(attributes, 0, sizeof *attributes);
    attributes->multiprocessorCount = 16 * m->compute_slices;
    attributes->gpuInstanceSliceCount = m->gpu_slices;
    attributes->computeInstanceSliceCount = m->compute_slices;
    attributes->memorySizeMB = m->memory_mib;
    return unlock_with(NVML_SUCCESS);
}

/* The unversioned symbol, for old callers. */
nvmlReturn_t nvmlDeviceGetAttributes(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes)
{
    return nvmlDeviceGetAttributes_v2(device, attributes);
}
