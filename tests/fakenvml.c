/* A fake libnvidia-ml.so.1 for tests: the NVML C functions hostd reads its GPU facts through,
 * with NVML's own return codes, struct layouts and buffer rules, answering for GPUs that an
 * environment variable describes. pynvml loads it by name (CDLL("libnvidia-ml.so.1")), so a
 * process started with LD_LIBRARY_PATH naming the directory it is built into gets it instead
 * of the real library, and every call goes through pynvml's real ctypes code.
 *
 * Read at init, as the real library enumerates its devices then:
 *   FAKE_NVML_GPUS        "name,total_mib,mig[,used_mib];..." per device; mig is 1 (enabled),
 *                         0 (disabled) or x (NVML_ERROR_NOT_SUPPORTED: a GPU without MIG).
 *                         Unset or empty: no devices.
 *   FAKE_NVML_DRIVER      the driver version string (default "550.54.15")
 *   FAKE_NVML_CUDA        the CUDA driver version as NVML encodes it (default 12040)
 *   FAKE_NVML_INIT_ERROR  an NVML return code init fails with (e.g. 9: driver not loaded)
 * Read at every device call:
 *   FAKE_NVML_LOST_FILE   a path; while that file exists and holds a device index, that device
 *                         answers NVML_ERROR_GPU_IS_LOST, as a GPU that fell off the bus does.
 * Hangs, as real NVML's calls do (seconds, or for good) when a GPU has fallen off the bus:
 *   FAKE_NVML_INIT_HOLD_FILE     a path; while that file exists, nvmlInit does not return
 *   FAKE_NVML_MEMINFO_HOLD_FILE  a path; while that file exists, nvmlDeviceGetMemoryInfo does
 *                                not return
 *   A held call creates "<path>.held" when it starts waiting (so a test knows one is held), and
 *   returns, as it would have, within 10 ms of the file's removal.
 *
 * Built with -DFAKE_NVML_NO_CUDA_V2 it lacks nvmlSystemGetCudaDriverVersion_v2, as drivers
 * before 10.1 do.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_UNKNOWN = 999,
} nvmlReturn_t;

/* nvml.h: typedef struct nvmlDevice_st* nvmlDevice_t; */
typedef struct nvmlDevice_st {
    unsigned int index;
    char name[96];
    unsigned long long total;
    unsigned long long used;
    int mig; /* 1, 0, or -1 for NOT_SUPPORTED */
} *nvmlDevice_t;

/* nvml.h's nvmlMemory_t (version 1), what nvmlDeviceGetMemoryInfo fills */
typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

#define MAX_DEVICES 64
#define MiB (1024ULL * 1024ULL)

static struct nvmlDevice_st devices[MAX_DEVICES];
static unsigned int device_count;
static unsigned int init_count; /* NVML counts inits: each init needs its own shutdown */
static char driver[80];
static int cuda;

static nvmlReturn_t copy_out(char *buf, unsigned int length, const char *value) {
    if (buf == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buf, value);
    return NVML_SUCCESS;
}

static void parse_devices(const char *spec) {
    char *copy = strdup(spec), *save = NULL;
    device_count = 0;
    for (char *dev = strtok_r(copy, ";", &save); dev != NULL && device_count < MAX_DEVICES;
         dev = strtok_r(NULL, ";", &save)) {
        struct nvmlDevice_st *d = &devices[device_count];
        char *fields[4] = {0}, *fsave = NULL;
        int n = 0;
        for (char *f = strtok_r(dev, ",", &fsave); f != NULL && n < 4;
             f = strtok_r(NULL, ",", &fsave))
            fields[n++] = f;
        if (n < 3)
            continue;
        memset(d, 0, sizeof *d);
        d->index = device_count;
        snprintf(d->name, sizeof d->name, "%s", fields[0]);
        d->total = strtoull(fields[1], NULL, 10) * MiB;
        d->mig = fields[2][0] == 'x' ? -1 : atoi(fields[2]);
        d->used = n == 4 ? strtoull(fields[3], NULL, 10) * MiB : 0;
        device_count++;
    }
    free(copy);
}

/* Wait while the file that environment variable `var` names exists; see the top. */
static void hold(const char *var) {
    const char *path = getenv(var);
    if (path == NULL || *path == '\0' || access(path, F_OK) != 0)
        return;
    char held[4096];
    snprintf(held, sizeof held, "%s.held", path);
    int fd = open(held, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0)
        close(fd);
    const struct timespec tick = {0, 10 * 1000 * 1000};
    while (access(path, F_OK) == 0)
        nanosleep(&tick, NULL);
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    hold("FAKE_NVML_INIT_HOLD_FILE");
    const char *fail = getenv("FAKE_NVML_INIT_ERROR");
    if (fail != NULL && *fail != '\0')
        return (nvmlReturn_t)atoi(fail);
    if (init_count++ > 0)
        return NVML_SUCCESS;
    const char *spec = getenv("FAKE_NVML_GPUS");
    parse_devices(spec != NULL ? spec : "");
    const char *drv = getenv("FAKE_NVML_DRIVER");
    snprintf(driver, sizeof driver, "%s", drv != NULL ? drv : "550.54.15");
    const char *cu = getenv("FAKE_NVML_CUDA");
    cuda = cu != NULL ? atoi(cu) : 12040;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    return copy_out(version, length, driver);
}

static nvmlReturn_t cuda_version(int *version) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (version == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *version = cuda;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) { return cuda_version(version); }

#ifndef FAKE_NVML_NO_CUDA_V2
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) { return cuda_version(version); }
#endif

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = device_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || index >= device_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

/* What every call on a device checks first: initialised, a handle we gave, not lost. */
static nvmlReturn_t check(nvmlDevice_t device) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (device < &devices[0] || device >= &devices[device_count])
        return NVML_ERROR_INVALID_ARGUMENT;
    const char *lost = getenv("FAKE_NVML_LOST_FILE");
    FILE *f = lost != NULL ? fopen(lost, "r") : NULL;
    if (f != NULL) {
        unsigned int index;
        int got = fscanf(f, "%u", &index);
        fclose(f);
        if (got == 1 && index == device->index)
            return NVML_ERROR_GPU_IS_LOST;
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    nvmlReturn_t r = check(device);
    return r != NVML_SUCCESS ? r : copy_out(name, length, device->name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    nvmlReturn_t r = check(device);
    if (r != NVML_SUCCESS)
        return r;
    char value[96];
    snprintf(value, sizeof value, "GPU-fa4e0000-0000-4000-8000-%012x", device->index);
    return copy_out(uuid, length, value);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    hold("FAKE_NVML_MEMINFO_HOLD_FILE");
    nvmlReturn_t r = check(device);
    if (r != NVML_SUCCESS)
        return r;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = device->total;
    memory->used = device->used;
    memory->free = device->total - device->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current,
                                  unsigned int *pending) {
    nvmlReturn_t r = check(device);
    if (r != NVML_SUCCESS)
        return r;
    if (current == NULL || pending == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->mig < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = (unsigned int)device->mig;
    return NVML_SUCCESS;
}
