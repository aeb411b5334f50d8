/* hostd._fastcopy: batches of small-file syscalls, in C, without the GIL.
 *
 * The native half of hostd/fastcopy.py (which holds the pure-Python twins and the contract).
 *
 * create_files(jobs, threads): a restore's files, from source descriptors. Per job
 * (dirfd, leaf, mode, size, src_fd, mtime_ns or None)
 *
 *     openat(dirfd, leaf, O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0600)
 *     copy `size` bytes from src_fd's position: copy_file_range, else sendfile
 *     fchmod(mode); futimens(mtime, mtime) unless mtime is None; close
 *
 * src_fd -1 creates an empty file. Workers take the next job index atomically; the first
 * failure stops them all (each finishes the job it holds). The answer is None, or
 * (index, errno, stage, short_by) of the first failure: stage 0 open, 1 copy, 2 fchmod,
 * 3 futimens, 4 close; short_by the bytes missing when the source ended early (errno EIO),
 * else -1. Python builds the exception, so both twins word it alike.
 *
 * write_blobs(jobs, threads, replace): a tier's blobs, from bytes in memory. Per job
 * (scratch, dest, data, mtime_ns or None, mode), first as an unnamed file:
 *
 *     open(dirname(dest), O_TMPFILE|O_WRONLY|O_CLOEXEC, 0600) (where that is ENOENT,
 *         mkdir(dirname(dest), 0777) and open again)
 *     pwrite all of data; futimens as below; fchmod(mode)
 *     linkat(fd, "", dest, AT_EMPTY_PATH), or where the kernel refuses that (older ones
 *         ask for CAP_DAC_READ_SEARCH), linkat("/proc/self/fd/N", dest, AT_SYMLINK_FOLLOW);
 *         close; stat(dest)
 *
 * only where the unnamed file is on the filesystem of the scratch's directory (the tier's,
 * which the caller's sync covers). The file has no name until it is whole, and gets it in
 * one step, as a rename would give it, without a scratch directory entry made and removed
 * (and without the filesystem's rename lock, which a rename across directories takes and
 * every writer of a tier shares; alone on an ext4 disk here, 44-68 µs a blob against
 * 120-540 with the rename). Where any of that fails (a filesystem without O_TMPFILE, no
 * /proc, a file already at dest, a prefix directory leading off the tier, a full or
 * read-only tier), the unnamed file vanishes with its descriptor (and a prefix directory
 * it made, with it) and the job is done the way below, whose outcome is the job's: a
 * failure is answered as it always was, and a leftover at dest is replaced (with `replace`
 * 0, a file at dest fails the job, (EEXIST, 5), and stays as it was). A filesystem
 * that refuses O_TMPFILE, or no /proc to name a file through, turns the first way off for
 * the rest of the process.
 *
 *     open(scratch, O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0600) (a scratch name
 *         taken already is a leftover of the caller's: unlinked, and opened again)
 *     pwrite all of data; futimens(mtime, mtime) unless None (EINVAL, EOVERFLOW, ERANGE
 *         ignored: the filesystem cannot hold that time, the blob keeps its write time)
 *     fchmod(mode); close; rename(scratch, dest), and where that is ENOENT,
 *         mkdir(dirname(dest), 0777) and rename again; stat(dest)
 *         (with `replace` 0: link(scratch, dest) and unlink(scratch) instead of the rename)
 *
 * Every job is tried, whatever the others did; no fsync (the caller syncs the batch). The
 * answer has one tuple per job, in order: (size, mtime_ns, ctime_ns) of the final stat, or
 * (errno, stage) where it failed: stage 0 open, 1 write, 2 futimens, 3 fchmod, 4 close,
 * 5 rename, 6 mkdir, 7 stat. A job that failed before its rename leaves no scratch behind.
 *
 * lstat_paths(paths): lstat() of each path (a symlink is not followed), without the GIL.
 * One answer per path, in order: (size, mtime_ns, ctime_ns, st_mode), or the errno where it
 * failed.
 *
 * link_files(jobs, threads): linkat(src_dirfd, src_rel, dst_dirfd, name, 0) per job
 * (src_dirfd, src_rel, dst_dirfd, name), without the GIL, each thread a share of the jobs in
 * order. Every job is tried; the answer is the errno of each (0: linked), in order.
 *
 * open_paths(paths): open(path, O_RDONLY|O_CLOEXEC) of each path (as os.open), without the
 * GIL; the descriptors, in order. The first failure stops the batch: what was opened is
 * closed and the failure raised as os.open raises it (OSError naming the path).
 *
 * fstat_fds(fds): fstat() of each descriptor, without the GIL: (st_mode, st_uid, st_dev,
 * st_ino, st_size, st_mtime_ns, st_ctime_ns) of each, in order; the first failure raised
 * as os.fstat raises it.
 *
 * lease_types(fds): fcntl(fd, F_GETLEASE) of each descriptor, without the GIL: the lease
 * type (F_RDLCK, F_WRLCK, F_UNLCK: a lease being broken answers the type it is to become),
 * or -errno where it failed, in order.
 *
 * take_leases(paths, signal): a read lease on each file, without the GIL:
 *
 *     open(path, O_RDONLY|O_NOFOLLOW|O_CLOEXEC|O_NONBLOCK); fcntl(F_SETSIG, signal);
 *     fcntl(F_SETLEASE, F_RDLCK); fstat
 *
 * Every path is tried. One answer per path, in order: (fd, fstat_fds' stat tuple), or
 * (errno, stage) where it failed (stage 0 open, 1 F_SETSIG, 2 F_SETLEASE, 3 fstat; the
 * descriptor closed: EAGAIN at 2, someone holds the file open for writing).
 *
 * close_fds(fds): close() of each descriptor, without the GIL; every one is closed, and the
 * first failure (but EINTR, after which Linux has closed it) raised as os.close raises it.
 *
 * The daemon's side of a restore calls these once per batch rather than os.open, os.fstat
 * or os.close once per file: each of those gives the GIL up and must take it back, which
 * takes up to a switch interval (5 ms) where another thread runs Python meanwhile.
 *
 * create_files runs in the restore helper after it took the caller's credentials and
 * capabilities: threads are created here, from the calling thread, so they inherit exactly
 * those (the capability sets are per thread). Nothing there resolves a path beyond one leaf
 * name under a directory descriptor the caller already checked. write_blobs runs in the
 * daemon, on paths inside its own private tier directories.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 16
#define STEP (1LL << 30) /* at most 1 GiB a call, as fileio.copy_range */
#define NS 1000000000LL

/* ---- a pool of threads taking the next job index ------------------------------------------ */

struct pool {
    size_t n;
    size_t chunk; /* jobs a worker takes at a time */
    atomic_size_t next;
    atomic_int stop;
    int (*one)(void *ctx, size_t i); /* runs job i; nonzero stops the pool */
    void *ctx;
};

static void pool_work(struct pool *p) {
    while (!atomic_load_explicit(&p->stop, memory_order_relaxed)) {
        size_t i = atomic_fetch_add_explicit(&p->next, p->chunk, memory_order_relaxed);
        if (i >= p->n)
            return;
        size_t end = p->n - i < p->chunk ? p->n : i + p->chunk;
        for (; i < end; i++)
            if (p->one(p->ctx, i)) {
                atomic_store(&p->stop, 1);
                return;
            }
    }
}

static void *worker(void *arg) {
    /* Signals are the interpreter's main thread's business, never a worker's. */
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pool_work((struct pool *)arg);
    return NULL;
}

/* Run n jobs on `threads` threads, the calling one included (clamped to 1..MAX_THREADS, and
 * to n), each taking the next `chunk` jobs in turn (chunk 0: n / threads, one share each).
 * Called without the GIL. */
static void pool_run(size_t n, int threads, size_t chunk, int (*one)(void *, size_t),
                     void *ctx) {
    struct pool p = {.n = n, .one = one, .ctx = ctx};
    atomic_init(&p.next, 0);
    atomic_init(&p.stop, 0);
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if ((size_t)threads > n)
        threads = (int)n;
    if (threads < 1)
        return;
    p.chunk = chunk ? chunk : (n + (size_t)threads - 1) / (size_t)threads;
    pthread_t tids[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[started], NULL, worker, &p) != 0)
            break; /* fewer threads, same result */
        started++;
    }
    pool_work(&p);
    for (int t = 0; t < started; t++)
        pthread_join(tids[t], NULL);
}

/* mtime in ns (any sign) -> timespec, flooring as os.utime(ns=...) does. */
static int ns_to_timespec(PyObject *obj, struct timespec *ts) {
    long long ns = PyLong_AsLongLong(obj);
    if (ns == -1 && PyErr_Occurred())
        return -1;
    long long sec = ns / NS, rem = ns % NS;
    if (rem < 0) {
        rem += NS;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
    return 0;
}

/* ---- create_files --------------------------------------------------------------------------- */

enum stage { STAGE_OPEN, STAGE_COPY, STAGE_CHMOD, STAGE_UTIME, STAGE_CLOSE };

struct job {
    int dirfd;
    const char *leaf;
    mode_t mode;
    long long size;
    int src;
    int has_mtime;
    struct timespec times[2];
};

struct batch {
    struct job *jobs;
    pthread_mutex_t lock; /* guards the fail_* fields: the first failure wins */
    int failed;
    size_t fail_index;
    int fail_errno;
    int fail_stage;
    long long short_by;
};

/* Copy `size` bytes, as hostd.fileio.copy_range: copy_file_range from the source's position
 * (it clones where the filesystem can), falling back to sendfile from offset size-left for
 * the pairs it cannot do; EIO with *short_by set where the source ends early. */
static int copy_range(int src, int dst, long long size, long long *short_by) {
    long long left = size;
    while (left > 0) {
        ssize_t n = copy_file_range(src, NULL, dst, NULL, (size_t)(left < STEP ? left : STEP), 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL)
                break;
            return errno;
        }
        if (n == 0)
            break;
        left -= n;
    }
    while (left > 0) {
        off_t off = (off_t)(size - left);
        ssize_t n = sendfile(dst, src, &off, (size_t)(left < STEP ? left : STEP));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0) {
            *short_by = left;
            return EIO;
        }
        left -= n;
    }
    return 0;
}

/* One job; 0, or an errno with *stage (and *short_by) saying where it failed. */
static int make_file(const struct job *j, int *stage, long long *short_by) {
    int fd, err = 0;
    do {
        fd = openat(j->dirfd, j->leaf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    0600);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        *stage = STAGE_OPEN;
        return errno;
    }
    if (j->src >= 0) {
        err = copy_range(j->src, fd, j->size, short_by);
        if (err)
            *stage = STAGE_COPY;
    }
    if (!err) {
        int rc;
        do {
            rc = fchmod(fd, j->mode);
        } while (rc < 0 && errno == EINTR);
        if (rc < 0) {
            err = errno;
            *stage = STAGE_CHMOD;
        }
    }
    if (!err && j->has_mtime && futimens(fd, j->times) < 0) {
        err = errno;
        *stage = STAGE_UTIME;
    }
    /* Linux frees the descriptor even when close reports an error (EINTR included). */
    if (close(fd) < 0 && !err && errno != EINTR) {
        err = errno;
        *stage = STAGE_CLOSE;
    }
    return err;
}

static int create_one(void *ctx, size_t i) {
    struct batch *b = ctx;
    int stage = 0;
    long long short_by = -1;
    int err = make_file(&b->jobs[i], &stage, &short_by);
    if (!err)
        return 0;
    pthread_mutex_lock(&b->lock);
    if (!b->failed) {
        b->failed = 1;
        b->fail_index = i;
        b->fail_errno = err;
        b->fail_stage = stage;
        b->short_by = short_by;
    }
    pthread_mutex_unlock(&b->lock);
    return 1;
}

static PyObject *create_files(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq_in;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O|i:create_files", &seq_in, &threads))
        return NULL;
    PyObject *seq = PySequence_Fast(seq_in, "jobs must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    struct job *jobs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct job));
    PyObject **names = PyMem_Calloc(n ? (size_t)n : 1, sizeof(PyObject *));
    PyObject *result = NULL;
    if (jobs == NULL || names == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *mtime;
        int mode;
        if (!PyTuple_Check(item)) {
            PyErr_Format(PyExc_TypeError, "job %zd is not a tuple", i);
            goto done;
        }
        if (!PyArg_ParseTuple(item, "iO&iLiO:job", &jobs[i].dirfd, PyUnicode_FSConverter,
                              &names[i], &mode, &jobs[i].size, &jobs[i].src, &mtime))
            goto done;
        jobs[i].leaf = PyBytes_AS_STRING(names[i]);
        jobs[i].mode = (mode_t)mode;
        if (mtime != Py_None) {
            if (ns_to_timespec(mtime, &jobs[i].times[0]) < 0)
                goto done;
            jobs[i].times[1] = jobs[i].times[0];
            jobs[i].has_mtime = 1;
        }
    }
    {
        struct batch b = {.jobs = jobs};
        pthread_mutex_init(&b.lock, NULL);
        Py_BEGIN_ALLOW_THREADS
        pool_run((size_t)n, threads, 1, create_one, &b);
        Py_END_ALLOW_THREADS
        pthread_mutex_destroy(&b.lock);
        if (b.failed)
            result = Py_BuildValue("(niiL)", (Py_ssize_t)b.fail_index, b.fail_errno,
                                   b.fail_stage, b.short_by);
        else
            result = Py_NewRef(Py_None);
    }
done:
    if (names != NULL)
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(names[i]);
    PyMem_Free(names);
    PyMem_Free(jobs);
    Py_DECREF(seq);
    return result;
}

/* ---- write_blobs ---------------------------------------------------------------------------- */

enum blob_stage { B_OPEN, B_WRITE, B_UTIME, B_CHMOD, B_CLOSE, B_RENAME, B_MKDIR, B_STAT };

struct blob {
    PyObject *scratch, *dest; /* bytes, from PyUnicode_FSConverter */
    Py_buffer data;           /* held across the GIL release: the exporter stays alive */
    int has_data;
    mode_t mode;
    int has_mtime;
    struct timespec times[2];
    dev_t tier_dev; /* st_dev of the scratch's directory (the tier's filesystem); 0: unknown */
    int replace;    /* 0: a file at dest is kept, and fails the job with EEXIST */
    int taken;      /* the unnamed way found a file at dest */
    /* the outcome */
    int err, stage;
    struct stat st;
};

static int open_scratch(const char *path) {
    const int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
    int fd;
    do {
        fd = open(path, flags, 0600);
    } while (fd < 0 && errno == EINTR);
    if (fd >= 0 || errno != EEXIST)
        return fd;
    /* The name carries the caller's pid, thread and batch index: a file there is a leftover
     * of an earlier batch of this thread that died half way, never someone else's. */
    if (unlink(path) < 0)
        return -1;
    do {
        fd = open(path, flags, 0600);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

static int write_all(int fd, const char *p, Py_ssize_t len) {
    Py_ssize_t off = 0;
    while (off < len) {
        ssize_t n = pwrite(fd, p + off, (size_t)(len - off), (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;
        off += n;
    }
    return 0;
}

/* rename(scratch, dest), or with `replace` 0 link(scratch, dest) then unlink(scratch) (a
 * file at dest stays: EEXIST); where dest's directory is missing (ENOENT), make it and
 * again. */
static int put(const char *scratch, const char *dest, int replace) {
    if (replace)
        return rename(scratch, dest);
    if (link(scratch, dest) < 0)
        return -1;
    unlink(scratch);
    return 0;
}

static int install(const char *scratch, const char *dest, int replace, int *stage) {
    *stage = B_RENAME;
    if (put(scratch, dest, replace) == 0)
        return 0;
    if (errno != ENOENT)
        return errno;
    const char *slash = strrchr(dest, '/');
    if (slash == NULL || slash == dest)
        return ENOENT;
    size_t len = (size_t)(slash - dest);
    char dir[PATH_MAX];
    if (len >= sizeof dir) {
        *stage = B_MKDIR;
        return ENAMETOOLONG;
    }
    memcpy(dir, dest, len);
    dir[len] = '\0';
    if (mkdir(dir, 0777) < 0 && errno != EEXIST) {
        *stage = B_MKDIR;
        return errno;
    }
    if (put(scratch, dest, replace) < 0)
        return errno;
    return 0;
}

/* Set once a filesystem refused O_TMPFILE, or a file could not be named through /proc; once
 * linkat(AT_EMPTY_PATH) was refused (a kernel that asks for CAP_DAC_READ_SEARCH). */
static atomic_int no_unnamed, no_empty_path;

/* Give the unnamed file `fd` the name `dest`: 0, or an errno. */
static int name_unnamed(int fd, const char *dest) {
    if (!atomic_load_explicit(&no_empty_path, memory_order_relaxed)) {
        if (linkat(fd, "", AT_FDCWD, dest, AT_EMPTY_PATH) == 0)
            return 0;
        if (errno != ENOENT && errno != EPERM)
            return errno;
        atomic_store(&no_empty_path, 1); /* (the capability is the process's: ask no more) */
    }
    char proc[40];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    if (linkat(AT_FDCWD, proc, AT_FDCWD, dest, AT_SYMLINK_FOLLOW) == 0)
        return 0;
    int err = errno;
    if (err == ENOENT && access("/proc/self/fd", X_OK) < 0)
        atomic_store(&no_unnamed, 1);
    return err;
}

/* One blob as an unnamed file named when whole (see the top of this file): 1 if it is
 * written (b->st its stat), 0 if the job is to be done with a scratch name instead, with
 * nothing of this attempt left (the prefix directory it made is removed again, if empty). */
static int write_unnamed(struct blob *b) {
    if (b->tier_dev == 0 || atomic_load_explicit(&no_unnamed, memory_order_relaxed))
        return 0;
    const char *dest = PyBytes_AS_STRING(b->dest);
    const char *slash = strrchr(dest, '/');
    char dir[PATH_MAX];
    size_t len = slash == NULL ? 0 : (size_t)(slash - dest);
    if (len == 0 || len >= sizeof dir)
        return 0;
    memcpy(dir, dest, len);
    dir[len] = '\0';
    int made = 0;
    int fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT) {
        made = mkdir(dir, 0777) == 0;
        if (made || errno == EEXIST)
            fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        if (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)
            atomic_store(&no_unnamed, 1);
        if (made)
            rmdir(dir);
        return 0;
    }
    struct stat st;
    /* On the tier's filesystem, which the caller's sync covers: a prefix directory that
     * leads elsewhere (a symlink) fails the scratch way's rename, EXDEV, as it always did. */
    int ok = fstat(fd, &st) == 0 && st.st_dev == b->tier_dev &&
             write_all(fd, b->data.buf, b->data.len) == 0 &&
             (!b->has_mtime || futimens(fd, b->times) == 0 || errno == EINVAL ||
              errno == EOVERFLOW || errno == ERANGE) &&
             fchmod(fd, b->mode) == 0 && (b->taken = name_unnamed(fd, dest)) == 0;
    /* Unnamed, the file goes with its descriptor. Named, a close that reports an error
     * (write-back on some filesystems) unnames it: the scratch way then answers. */
    if (close(fd) < 0 && ok && errno != EINTR) {
        unlink(dest);
        ok = 0;
    }
    /* The stat of the named file, after its close, as the scratch way takes it; a failure
     * here leaves it to the scratch way, whose rename replaces it. */
    if (ok && stat(dest, &b->st) < 0)
        ok = 0;
    if (!ok && made)
        rmdir(dir);
    return ok;
}

/* One blob; 0, or an errno with *stage saying where it failed. */
static int write_blob(struct blob *b, int *stage) {
    if (write_unnamed(b))
        return 0;
    if (!b->replace && b->taken == EEXIST) {
        *stage = B_RENAME;
        return EEXIST;
    }
    const char *scratch = PyBytes_AS_STRING(b->scratch);
    int err = 0, rc;
    int fd = open_scratch(scratch);
    if (fd < 0) {
        *stage = B_OPEN;
        return errno;
    }
    err = write_all(fd, b->data.buf, b->data.len);
    if (err)
        *stage = B_WRITE;
    if (!err && b->has_mtime && futimens(fd, b->times) < 0 && errno != EINVAL &&
        errno != EOVERFLOW && errno != ERANGE) {
        err = errno;
        *stage = B_UTIME;
    }
    if (!err) {
        do {
            rc = fchmod(fd, b->mode);
        } while (rc < 0 && errno == EINTR);
        if (rc < 0) {
            err = errno;
            *stage = B_CHMOD;
        }
    }
    /* Linux frees the descriptor even when close reports an error (EINTR included). */
    if (close(fd) < 0 && !err && errno != EINTR) {
        err = errno;
        *stage = B_CLOSE;
    }
    if (!err)
        err = install(scratch, PyBytes_AS_STRING(b->dest), b->replace, stage);
    if (err) {
        unlink(scratch); /* best effort: on a read-only tier this fails too */
        return err;
    }
    if (stat(PyBytes_AS_STRING(b->dest), &b->st) < 0) {
        *stage = B_STAT;
        return errno;
    }
    return 0;
}

static int blob_one(void *ctx, size_t i) {
    struct blob *b = &((struct blob *)ctx)[i];
    b->err = write_blob(b, &b->stage);
    return 0; /* each blob is independent: the others go on */
}

static PyObject *ns_of(const struct timespec *ts) {
    return PyLong_FromLongLong((long long)ts->tv_sec * NS + ts->tv_nsec);
}

static PyObject *outcome(const struct blob *b) {
    if (b->err)
        return Py_BuildValue("(ii)", b->err, b->stage);
    PyObject *size = PyLong_FromLongLong((long long)b->st.st_size);
    PyObject *mtime = ns_of(&b->st.st_mtim);
    PyObject *ctime = ns_of(&b->st.st_ctim);
    PyObject *t = NULL;
    if (size != NULL && mtime != NULL && ctime != NULL)
        t = PyTuple_Pack(3, size, mtime, ctime);
    Py_XDECREF(size);
    Py_XDECREF(mtime);
    Py_XDECREF(ctime);
    return t;
}

/* st_dev of the directory of `scratch` (the tier's tmp/), 0 where it cannot be had: the
 * jobs of a call name one or a few such directories, so the last one is kept in `last`. */
static dev_t scratch_dev(const char *scratch, char *last, dev_t *last_dev) {
    const char *slash = strrchr(scratch, '/');
    size_t len = slash == NULL ? 0 : (size_t)(slash - scratch);
    if (len == 0 || len >= PATH_MAX)
        return 0;
    if (strncmp(last, scratch, len) == 0 && last[len] == '\0')
        return *last_dev;
    struct stat st;
    memcpy(last, scratch, len);
    last[len] = '\0';
    *last_dev = stat(last, &st) == 0 ? st.st_dev : 0;
    return *last_dev;
}

static PyObject *write_blobs(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq_in;
    int threads = 1, replace = 1;
    char last_dir[PATH_MAX] = "";
    dev_t last_dev = 0;
    if (!PyArg_ParseTuple(args, "O|ii:write_blobs", &seq_in, &threads, &replace))
        return NULL;
    PyObject *seq = PySequence_Fast(seq_in, "jobs must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i;
    struct blob *blobs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct blob));
    PyObject *result = NULL;
    if (blobs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        struct blob *b = &blobs[i];
        PyObject *mtime;
        int mode;
        if (!PyTuple_Check(item)) {
            PyErr_Format(PyExc_TypeError, "job %zd is not a tuple", i);
            goto done;
        }
        if (!PyArg_ParseTuple(item, "O&O&y*Oi:job", PyUnicode_FSConverter, &b->scratch,
                              PyUnicode_FSConverter, &b->dest, &b->data, &mtime, &mode))
            goto done;
        b->has_data = 1;
        b->replace = replace;
        b->mode = (mode_t)mode;
        if (mtime != Py_None) {
            if (ns_to_timespec(mtime, &b->times[0]) < 0)
                goto done;
            b->times[1] = b->times[0];
            b->has_mtime = 1;
        }
        b->tier_dev = scratch_dev(PyBytes_AS_STRING(b->scratch), last_dir, &last_dev);
    }
    Py_BEGIN_ALLOW_THREADS
    pool_run((size_t)n, threads, 1, blob_one, blobs);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *t = outcome(&blobs[i]);
        if (t == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, t);
    }
done:
    if (blobs != NULL)
        for (i = 0; i < n; i++) {
            Py_XDECREF(blobs[i].scratch);
            Py_XDECREF(blobs[i].dest);
            if (blobs[i].has_data)
                PyBuffer_Release(&blobs[i].data);
        }
    PyMem_Free(blobs);
    Py_DECREF(seq);
    return result;
}

/* ---- lstat_paths, link_files, open_paths ----------------------------------------------------- */

struct named {
    PyObject *a, *b; /* bytes from PyUnicode_FSConverter; b unused by lstat_paths */
    int fd_a, fd_b;
    int err;
    struct stat st;
};

static void named_free(struct named *v, Py_ssize_t n) {
    if (v == NULL)
        return;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(v[i].a);
        Py_XDECREF(v[i].b);
    }
    PyMem_Free(v);
}

/* A sequence of paths as a tuple of its own (a path's __fspath__ may change the sequence
 * while the paths are converted) and an array of *n entries, each path converted into
 * `a` (PyUnicode_FSConverter): both new (named_free the array). NULL, with an exception
 * set and nothing left, where anything fails. */
static struct named *named_of(PyObject *arg, PyObject **tuple, Py_ssize_t *n) {
    PyObject *seq = PySequence_Tuple(arg);
    if (seq == NULL)
        return NULL;
    *n = PyTuple_GET_SIZE(seq);
    struct named *v = PyMem_Calloc(*n ? (size_t)*n : 1, sizeof(struct named));
    if (v == NULL)
        PyErr_NoMemory();
    for (Py_ssize_t i = 0; v != NULL && i < *n; i++)
        if (!PyUnicode_FSConverter(PyTuple_GET_ITEM(seq, i), &v[i].a)) {
            named_free(v, *n);
            v = NULL;
        }
    if (v == NULL)
        Py_DECREF(seq);
    else
        *tuple = seq;
    return v;
}

static int stat_one(void *ctx, size_t i) {
    struct named *v = &((struct named *)ctx)[i];
    v->err = lstat(PyBytes_AS_STRING(v->a), &v->st) < 0 ? errno : 0;
    return 0; /* each stat is independent: the others go on */
}

static PyObject *lstat_paths(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq_in;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O|i:lstat_paths", &seq_in, &threads))
        return NULL;
    PyObject *seq;
    Py_ssize_t n, i;
    struct named *v = named_of(seq_in, &seq, &n);
    if (v == NULL)
        return NULL;
    PyObject *result = NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_run((size_t)n, threads, 0, stat_one, v);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *t;
        if (v[i].err) {
            t = PyLong_FromLong(v[i].err);
        } else {
            PyObject *size = PyLong_FromLongLong((long long)v[i].st.st_size);
            PyObject *mtime = ns_of(&v[i].st.st_mtim);
            PyObject *ctime = ns_of(&v[i].st.st_ctim);
            PyObject *mode = PyLong_FromUnsignedLong((unsigned long)v[i].st.st_mode);
            t = (size && mtime && ctime && mode) ? PyTuple_Pack(4, size, mtime, ctime, mode)
                                                 : NULL;
            Py_XDECREF(size);
            Py_XDECREF(mtime);
            Py_XDECREF(ctime);
            Py_XDECREF(mode);
        }
        if (t == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, t);
    }
done:
    named_free(v, n);
    Py_DECREF(seq);
    return result;
}

static int link_one(void *ctx, size_t i) {
    struct named *v = &((struct named *)ctx)[i];
    v->err = linkat(v->fd_a, PyBytes_AS_STRING(v->a), v->fd_b, PyBytes_AS_STRING(v->b), 0) < 0
                 ? errno
                 : 0;
    return 0; /* each link is independent: the others go on */
}

static PyObject *link_files(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq_in;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O|i:link_files", &seq_in, &threads))
        return NULL;
    PyObject *seq = PySequence_Fast(seq_in, "jobs must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i;
    struct named *v = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct named));
    PyObject *result = NULL;
    if (v == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item)) {
            PyErr_Format(PyExc_TypeError, "job %zd is not a tuple", i);
            goto done;
        }
        if (!PyArg_ParseTuple(item, "iO&iO&:job", &v[i].fd_a, PyUnicode_FSConverter, &v[i].a,
                              &v[i].fd_b, PyUnicode_FSConverter, &v[i].b))
            goto done;
    }
    /* One share of the jobs per thread (chunk 0): the jobs come in tree order, so each
     * thread links into directories of its own, and no two wait on one directory's lock. */
    Py_BEGIN_ALLOW_THREADS
    pool_run((size_t)n, threads, 0, link_one, v);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *e = PyLong_FromLong(v[i].err);
        if (e == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, e);
    }
done:
    named_free(v, n);
    Py_DECREF(seq);
    return result;
}

static PyObject *open_paths(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq;
    Py_ssize_t n, i, opened = 0;
    struct named *v = named_of(arg, &seq, &n);
    if (v == NULL)
        return NULL;
    PyObject *result = NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; opened < n; opened++) {
        int fd;
        do {
            fd = open(PyBytes_AS_STRING(v[opened].a), O_RDONLY | O_CLOEXEC);
        } while (fd < 0 && errno == EINTR);
        if (fd < 0) {
            err = errno;
            break;
        }
        v[opened].fd_a = fd;
    }
    if (err)
        for (i = 0; i < opened; i++)
            close(v[i].fd_a);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, PyTuple_GET_ITEM(seq, opened));
        goto done;
    }
    result = PyList_New(n);
    if (result == NULL) {
        for (i = 0; i < n; i++)
            close(v[i].fd_a);
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *fd = PyLong_FromLong(v[i].fd_a);
        if (fd == NULL) { /* the list holds the ones before: close those and the rest */
            for (Py_ssize_t j = 0; j < n; j++)
                close(v[j].fd_a);
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, fd);
    }
done:
    named_free(v, n);
    Py_DECREF(seq);
    return result;
}

/* The descriptors of a sequence of ints, as C ints (PyMem); NULL with an exception set. */
static int *fds_of(PyObject *seq, Py_ssize_t n) {
    int *fds = PyMem_Calloc(n ? (size_t)n : 1, sizeof(int));
    if (fds == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (fd == -1 && PyErr_Occurred()) {
            PyMem_Free(fds);
            return NULL;
        }
        if (fd < INT_MIN || fd > INT_MAX) { /* as os.close says it; -1 and such: EBADF */
            PyErr_SetString(PyExc_OverflowError, "descriptor out of the range of a C int");
            PyMem_Free(fds);
            return NULL;
        }
        fds[i] = (int)fd;
    }
    return fds;
}

static PyObject *fstat_fds(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "fds must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i, done = 0;
    PyObject *result = NULL;
    int err = 0;
    struct stat *st = PyMem_Calloc(n ? (size_t)n : 1, sizeof(struct stat));
    int *fds = st == NULL ? NULL : fds_of(seq, n);
    if (st == NULL)
        PyErr_NoMemory();
    if (fds == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (; done < n; done++)
        if (fstat(fds[done], &st[done]) < 0) {
            err = errno;
            break;
        }
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(kkKKLNN)", (unsigned long)st[i].st_mode,
                                    (unsigned long)st[i].st_uid, (unsigned long long)st[i].st_dev,
                                    (unsigned long long)st[i].st_ino, (long long)st[i].st_size,
                                    ns_of(&st[i].st_mtim), ns_of(&st[i].st_ctim));
        if (t == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, t);
    }
done:
    PyMem_Free(fds);
    PyMem_Free(st);
    Py_DECREF(seq);
    return result;
}

static PyObject *close_fds(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "fds must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int err = 0;
    int *fds = fds_of(seq, n);
    Py_DECREF(seq);
    if (fds == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (close(fds[i]) < 0 && errno != EINTR && !err)
            err = errno;
    Py_END_ALLOW_THREADS
    PyMem_Free(fds);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *lease_types(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "fds must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int *fds = fds_of(seq, n);
    Py_DECREF(seq);
    if (fds == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int r = fcntl(fds[i], F_GETLEASE);
        fds[i] = r < 0 ? -errno : r; /* (the answers take the descriptors' places) */
    }
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (v == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, v);
    }
    PyMem_Free(fds);
    return out;
}

static PyObject *take_leases(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *arg;
    int sig;
    if (!PyArg_ParseTuple(args, "Oi", &arg, &sig))
        return NULL;
    PyObject *seq;
    Py_ssize_t n, i;
    struct named *v = named_of(arg, &seq, &n);
    if (v == NULL)
        return NULL;
    PyObject *result = NULL;
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        struct named *x = &v[i];
        int fd;
        do {
            fd = open(PyBytes_AS_STRING(x->a), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        } while (fd < 0 && errno == EINTR);
        x->fd_a = -1;
        x->fd_b = 0; /* the stage */
        if (fd < 0) {
            x->err = errno;
            continue;
        }
        if (fcntl(fd, F_SETSIG, sig) < 0)
            x->fd_b = 1;
        else if (fcntl(fd, F_SETLEASE, F_RDLCK) < 0)
            x->fd_b = 2;
        else if (fstat(fd, &x->st) < 0)
            x->fd_b = 3;
        else {
            x->fd_a = fd;
            continue;
        }
        x->err = errno;
        close(fd);
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    for (i = 0; result != NULL && i < n; i++) {
        struct named *x = &v[i];
        PyObject *t;
        if (x->fd_a < 0)
            t = Py_BuildValue("(ii)", x->err, x->fd_b);
        else
            t = Py_BuildValue("(i(kkKKLNN))", x->fd_a, (unsigned long)x->st.st_mode,
                              (unsigned long)x->st.st_uid, (unsigned long long)x->st.st_dev,
                              (unsigned long long)x->st.st_ino, (long long)x->st.st_size,
                              ns_of(&x->st.st_mtim), ns_of(&x->st.st_ctim));
        if (t == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, t);
    }
    if (result == NULL) /* (no answer: no lease is kept) */
        for (i = 0; i < n; i++)
            if (v[i].fd_a >= 0)
                close(v[i].fd_a);
    named_free(v, n);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"create_files", create_files, METH_VARARGS,
     "create_files(jobs, threads=1) -> None | (index, errno, stage, short_by)\n\n"
     "Create each job's file (see hostd/fastcopy.py) on `threads` threads without the GIL; "
     "None, or where the first failure happened."},
    {"write_blobs", write_blobs, METH_VARARGS,
     "write_blobs(jobs, threads=1, replace=1) -> [(size, mtime_ns, ctime_ns) | (errno, stage)]"
     "\n\n"
     "Write each job's blob (see hostd/fastcopy.py) on `threads` threads without the GIL; "
     "one outcome per job, in order."},
    {"lstat_paths", lstat_paths, METH_VARARGS,
     "lstat_paths(paths, threads=1) -> [(size, mtime_ns, ctime_ns, st_mode) | errno]\n\n"
     "lstat() each path on `threads` threads without the GIL; one outcome per path, in "
     "order."},
    {"link_files", link_files, METH_VARARGS,
     "link_files(jobs, threads=1) -> [errno]\n\n"
     "linkat(src_dirfd, src_rel, dst_dirfd, name, 0) per job on `threads` threads without "
     "the GIL; 0: linked."},
    {"open_paths", open_paths, METH_O,
     "open_paths(paths) -> [fd]\n\n"
     "open(path, O_RDONLY|O_CLOEXEC) each path without the GIL; the first failure closes "
     "what was opened and raises OSError naming the path."},
    {"fstat_fds", fstat_fds, METH_O,
     "fstat_fds(fds) -> [(mode, uid, dev, ino, size, mtime_ns, ctime_ns)]\n\n"
     "fstat() each descriptor without the GIL; the first failure raised as OSError."},
    {"lease_types", lease_types, METH_O,
     "lease_types(fds) -> [type | -errno]\n\n"
     "fcntl(fd, F_GETLEASE) each descriptor without the GIL; -errno where it failed."},
    {"take_leases", take_leases, METH_VARARGS,
     "take_leases(paths, signal) -> [(fd, stat) | (errno, stage)]\n\n"
     "A read lease on each file (open, F_SETSIG, F_SETLEASE, fstat) without the GIL; every "
     "path tried, one answer each, in order."},
    {"close_fds", close_fds, METH_O,
     "close_fds(fds) -> None\n\n"
     "close() each descriptor without the GIL; the first failure raised as OSError."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hostd._fastcopy",
    .m_doc = "Batches of file syscalls for restores and tiers, in C (the twins are "
             "hostd/fastcopy.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastcopy(void) { return PyModule_Create(&module); }
