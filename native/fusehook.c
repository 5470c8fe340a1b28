/*
 * Session hook for the protected mount's pyfuse3 session (zfsrep._fusehook).
 *
 * 1. FUSE_HANDLE_KILLPRIV_V2. Unless the filesystem takes over killing set-id bits and
 *    capabilities, the kernel does not mark the superblock SB_NOSEC, and then every write(2)
 *    through the mount first asks the daemon for "security.capability": one synchronous
 *    round trip per write (4 KiB buffered writes ran 4x slower). libfuse 3.14 (Debian 12)
 *    predates the flag and pyfuse3 exposes no connection flags, so the hook adds it to the
 *    INIT reply when the kernel offers it.
 *
 * 2. A fast path for READ, WRITE and RELEASE on files the daemon registered (zf_register),
 *    FSYNC (on a worker thread), times-only SETATTR, GETXATTR of registered regular files and
 *    LOOKUP of absent names in registered directories (zf_register_node), and LSEEK and
 *    FALLOCATE, which pyfuse3 cannot answer at all. In Python
 *    each request costs 50-100 us of pyfuse3/trio/handler overhead; here a request is one
 *    pread/pwrite on the backing descriptor (the file handle *is* the backing descriptor) and
 *    one reply. A WRITE is recorded before it is answered, exactly as the Python path does:
 *    its data is copied into a queue that the capture stream drains, in order, before it
 *    records anything else (zf_take), so the stream stays in completion order. Anything the
 *    fast path does not handle (unregistered handles, files with set-id bits written by an
 *    unprivileged opener, a full queue, malformed requests) goes to Python unchanged.
 *
 * How: fuse_session_new() is interposed (this library is loaded RTLD_GLOBAL before pyfuse3,
 * so pyfuse3's reference binds here) only to remember the session; zf_install() then gives
 * the session custom read/writev functions (fuse_session_custom_io). All of this runs on the
 * daemon's one event-loop thread, inside pyfuse3's call to fuse_session_receive_buf().
 */
#define _GNU_SOURCE
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <stdio.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>
#include <linux/fuse.h>

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include "fusehook.h"

/* Attribute and entry cache timeout in replies (seconds): mountd/passthrough.py
 * CACHE_TIMEOUT. */
#define ZF_ATTR_TIMEOUT 10

#ifndef FUSE_HANDLE_KILLPRIV_V2
#define FUSE_HANDLE_KILLPRIV_V2 (1u << 28)
#endif

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t,
                                               void *);

struct zf_file {
    uint64_t ident;
    uint32_t uid;
    uint8_t used;
    uint8_t capture;
};

static struct fuse_session *zf_session;
static uint64_t zf_init_unique;
static int zf_init_seen, zf_reply_seen;
static uint32_t zf_offered, zf_added;

static int zf_fast;                 /* fast path enabled */
static int zf_frozen;               /* checkpoint barrier: mutating requests go to Python */
static int zf_eventfd = -1;         /* signalled when the queue should be drained */
static int zf_fd = -1;              /* the session's /dev/fuse descriptor (non-blocking) */
static struct zf_file *zf_files;    /* indexed by file handle (= backing fd) */
static size_t zf_files_cap;
static zf_rec *zf_queue;
static size_t zf_qlen, zf_qcap, zf_qbytes;
static size_t zf_limit = 32u << 20; /* queue + capture memory the fast path may fill */
static int64_t zf_held_elsewhere;   /* captured bytes the Python side holds (zf_add_held; atomic:
                                      * the capture stream's sink thread releases them) */
static size_t zf_signal_at = 4u << 20;
static int zf_signalled;
static uint8_t *zf_rbuf;
static size_t zf_rbuf_cap;
/* Requests are read into zf_inbuf (not libfuse's buffer) while the fast path is on, so that a
 * large captured WRITE can keep the buffer its data arrived in; what the fast path does not
 * answer is copied to libfuse's buffer. */
static uint8_t *zf_inbuf;
static size_t zf_inbuf_cap;
#define ZF_KEEP_MIN (64u << 10)
/* Request buffers the capture stream kept and has freed (zf_free), for the next requests:
 * glibc would otherwise place each new 1 MiB buffer wherever its free chunks fit, and with
 * the capture stream's other allocations between them the heap grew to ~110 MiB before it
 * settled, every new page a fault (27,000 per GiB on a fresh mount). Pooled, a request
 * buffer is reused as it is, already in memory. At most ZF_POOL_MAX buffers, and pooled
 * and captured bytes together never more than the fast path's memory limit. */
#define ZF_POOL_MAX 64
static uint8_t *zf_pool[ZF_POOL_MAX];
static size_t zf_pool_n, zf_pool_size;
static pthread_mutex_t zf_pool_mu = PTHREAD_MUTEX_INITIALIZER;
/* How long the fast path waits for a next request before returning to the event loop, and
 * how long it may serve requests in all before it returns. */
#define ZF_LINGER_NS 200000
#define ZF_BUDGET_NS 5000000
/* After answering a request, wait for the next one awake (polling) for up to ZF_SPIN_NS
 * before sleeping: an application that waits for each answer (random reads, one at a time)
 * sends its next request a few microseconds later, and waking a sleeping thread costs more
 * than that on a virtual machine (random 4 KiB reads: 21k requests/s asleep, 51k awake, as
 * libfuse's multi-threaded loop gets with a thread always waiting). A wait that ends asleep
 * means requests are further apart: the next ZF_SPIN_BACKOFF waits sleep at once, so a
 * trickle of requests costs at most 1/ZF_SPIN_BACKOFF of ZF_SPIN_NS each. */
#define ZF_SPIN_NS 50000
#define ZF_SPIN_BACKOFF 64
static unsigned zf_spin_skip;
static zf_counters zf_count;
/* The spool's run state (zf_set_run_counter): [0] records queued, [3] 1 while a mutating
 * request is being served here (from before the backing file changes until its record is
 * queued and answered). */
static uint64_t *zf_run;
/* zf_set_dirty_table: [0] fast-path records written, [1] last seq written, [3] overflow,
 * slots of three words from [8]. */
static uint64_t *zf_dirty;
static int mark_fast(const struct zf_file *f);

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata)
{
    session_new_fn real = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
    if (real == NULL)
        return NULL;
    zf_session = real(args, op, op_size, userdata);
    zf_init_seen = zf_reply_seen = 0;
    zf_added = 0;
    return zf_session;
}

static void reply(int fd, uint64_t unique, int error, const void *arg, size_t len)
{
    struct fuse_out_header out = {
        .len = (uint32_t)(sizeof out + (error ? 0 : len)),
        .error = error ? -error : 0,
        .unique = unique,
    };
    struct iovec iov[2] = {{&out, sizeof out}, {(void *)arg, len}};
    /* The kernel takes a reply whole or not at all; a failure here means the request was
     * interrupted or the connection is gone, which the next read reports. */
    (void)writev(fd, iov, error || len == 0 ? 1 : 2);
}

static uint64_t ns_of(struct timespec t)
{
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static struct zf_file *file_of(uint64_t fh)
{
    if (fh >= zf_files_cap || !zf_files[fh].used)
        return NULL;
    return &zf_files[fh];
}

static size_t held_elsewhere(void)
{
    int64_t held = __atomic_load_n(&zf_held_elsewhere, __ATOMIC_RELAXED);
    return held > 0 ? (size_t)held : 0;
}

static int push(zf_rec rec)
{
    if (zf_qlen == zf_qcap) {
        size_t cap = zf_qcap ? zf_qcap * 2 : 256;
        zf_rec *q = realloc(zf_queue, cap * sizeof *q);
        if (q == NULL)
            return -1;
        zf_queue = q;
        zf_qcap = cap;
    }
    zf_queue[zf_qlen++] = rec;
    /* (one writer, the serving thread; zf_free reads it from an encoder thread) */
    __atomic_store_n(&zf_qbytes, zf_qbytes + rec.len, __ATOMIC_RELAXED);
    if (zf_run != NULL)
        __atomic_add_fetch(zf_run, 1, __ATOMIC_RELAXED);
    if (zf_eventfd >= 0 && !zf_signalled && zf_qbytes >= zf_signal_at) {
        uint64_t one = 1;
        if (write(zf_eventfd, &one, sizeof one) == sizeof one)
            zf_signalled = 1;
    }
    return 0;
}

/* 1 if the request was answered here, 0 to hand it to libfuse/pyfuse3. */
static int fast_write(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_write_in *w = (const void *)(in + 1);
    if (n < sizeof *in + sizeof *w || n != sizeof *in + sizeof *w + w->size)
        return 0;
    struct zf_file *f = file_of(w->fh);
    if (f == NULL || zf_frozen)
        return 0;
    if (f->capture && zf_qbytes + held_elsewhere() + w->size > zf_limit)
        return 0; /* the Python path waits for the spool */
    struct stat st;
    if (fstat((int)w->fh, &st) != 0)
        return 0;
    if ((st.st_mode & (S_ISUID | S_ISGID)) && f->uid != 0)
        return 0; /* set-id bits to clear: the Python path records that */
    if (f->capture)
        (void)mark_fast(f); /* (a full table is flagged in it: the restart refuses) */
    const uint8_t *data = (const uint8_t *)(w + 1);
    ssize_t done = pwrite((int)w->fh, data, w->size, (off_t)w->offset);
    if (done < 0) {
        reply(fd, in->unique, errno, NULL, 0);
        return 1;
    }
    /* The kernel's writeback cache owns the file times (see BackingVolume.write). */
    struct timespec times[2] = {st.st_atim, st.st_mtim};
    (void)futimens((int)w->fh, times);
    if (f->capture) {
        zf_rec rec = {.kind = ZF_WRITE, .ident = f->ident, .offset = w->offset,
                      .mtime_ns = ns_of(st.st_mtim), .len = (size_t)done};
        size_t head = (size_t)(data - (const uint8_t *)in);
        if ((const uint8_t *)in == zf_inbuf && (size_t)done >= ZF_KEEP_MIN) {
            /* A large write keeps the request buffer itself: no copy. The next request is
             * read into another buffer of the same size, one the capture stream has freed
             * if the pool holds one (request_buffer, zf_free). */
            rec.owner = zf_inbuf;
            zf_inbuf = NULL;
            zf_inbuf_cap = 0;
        } else if ((rec.owner = malloc(done ? (size_t)done : 1)) != NULL) {
            memcpy(rec.owner, data, (size_t)done);
            head = 0;
        }
        rec.data = rec.owner != NULL ? rec.owner + head : NULL;
        if (rec.owner == NULL || push(rec) != 0) {
            /* Cannot record it: the data is in the backing file but not in the stream.
             * Fail the request so nothing is silently lost (the kernel retries or reports
             * EIO to the application). */
            free(rec.owner);
            reply(fd, in->unique, EIO, NULL, 0);
            return 1;
        }
    }
    struct fuse_write_out out = {.size = (uint32_t)done};
    reply(fd, in->unique, 0, &out, sizeof out);
    zf_count.writes++;
    return 1;
}

static int fast_read(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_read_in *r = (const void *)(in + 1);
    if (n < sizeof *in + sizeof *r || file_of(r->fh) == NULL)
        return 0;
    if (r->size > zf_rbuf_cap) {
        uint8_t *b = realloc(zf_rbuf, r->size);
        if (b == NULL)
            return 0;
        zf_rbuf = b;
        zf_rbuf_cap = r->size;
    }
    ssize_t got = pread((int)r->fh, zf_rbuf, r->size, (off_t)r->offset);
    if (got < 0)
        reply(fd, in->unique, errno, NULL, 0);
    else
        reply(fd, in->unique, 0, zf_rbuf, (size_t)got);
    zf_count.reads++;
    return 1;
}

/* The times the kernel's writeback cache flushes (SETATTR with only times on an open file):
 * the most frequent SETATTR, answered here like BackingVolume.setattr does. */
static int fast_setattr(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_setattr_in *a = (const void *)(in + 1);
    const uint32_t allowed = FATTR_ATIME | FATTR_MTIME | FATTR_CTIME | FATTR_ATIME_NOW |
                             FATTR_MTIME_NOW | FATTR_FH | FATTR_LOCKOWNER;
    if (n < sizeof *in + sizeof *a || !(a->valid & FATTR_FH) || (a->valid & ~allowed) ||
        !(a->valid & (FATTR_ATIME | FATTR_MTIME)))
        return 0;
    struct zf_file *f = file_of(a->fh);
    if (f == NULL || zf_frozen || (f->capture && zf_qbytes + held_elsewhere() > zf_limit))
        return 0;
    struct timespec ts[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
    if (a->valid & FATTR_ATIME)
        ts[0] = (a->valid & FATTR_ATIME_NOW) ? (struct timespec){0, UTIME_NOW}
                                             : (struct timespec){(time_t)a->atime,
                                                                 (long)a->atimensec};
    if (a->valid & FATTR_MTIME)
        ts[1] = (a->valid & FATTR_MTIME_NOW) ? (struct timespec){0, UTIME_NOW}
                                             : (struct timespec){(time_t)a->mtime,
                                                                 (long)a->mtimensec};
    struct stat st;
    if (f->capture)
        (void)mark_fast(f);
    if (futimens((int)a->fh, ts) != 0 || fstat((int)a->fh, &st) != 0) {
        reply(fd, in->unique, errno, NULL, 0);
        return 1;
    }
    if (f->capture) {
        zf_rec rec = {.kind = ZF_SETATTR, .ident = f->ident, .mtime_ns = ns_of(st.st_mtim),
                      .mode = st.st_mode, .uid = st.st_uid, .gid = st.st_gid};
        if (push(rec) != 0) {
            reply(fd, in->unique, EIO, NULL, 0);
            return 1;
        }
    }
    struct fuse_attr_out out;
    memset(&out, 0, sizeof out);
    out.attr_valid = ZF_ATTR_TIMEOUT;
    out.attr = (struct fuse_attr){
        .ino = in->nodeid, .size = (uint64_t)st.st_size, .blocks = (uint64_t)st.st_blocks,
        .atime = (uint64_t)st.st_atim.tv_sec, .mtime = (uint64_t)st.st_mtim.tv_sec,
        .ctime = (uint64_t)st.st_ctim.tv_sec, .atimensec = (uint32_t)st.st_atim.tv_nsec,
        .mtimensec = (uint32_t)st.st_mtim.tv_nsec, .ctimensec = (uint32_t)st.st_ctim.tv_nsec,
        .mode = st.st_mode, .nlink = (uint32_t)st.st_nlink, .uid = st.st_uid,
        .gid = st.st_gid, .rdev = (uint32_t)st.st_rdev, .blksize = (uint32_t)st.st_blksize};
    reply(fd, in->unique, 0, &out, sizeof out);
    zf_count.setattrs++;
    return 1;
}

/* FSYNC on a worker thread: the event loop goes on serving requests while the disk works, and
 * the reply goes straight back to the kernel (writev on /dev/fuse is one message, so replies
 * from two threads do not mix). A full queue hands the request to Python. */
#define ZF_SYNC_SLOTS 64
struct zf_sync { uint64_t fh, unique; int datasync; };
static struct zf_sync zf_syncq[ZF_SYNC_SLOTS];
static size_t zf_sync_head, zf_sync_len;
static int zf_sync_busy, zf_sync_stop, zf_sync_started, zf_fuse_fd = -1;
static pthread_t zf_sync_thread;
static pthread_mutex_t zf_sync_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t zf_sync_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t zf_sync_idle = PTHREAD_COND_INITIALIZER;

static void *sync_worker(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&zf_sync_mu);
    for (;;) {
        while (zf_sync_len == 0 && !zf_sync_stop)
            pthread_cond_wait(&zf_sync_cv, &zf_sync_mu);
        if (zf_sync_len == 0)
            break;
        struct zf_sync job = zf_syncq[zf_sync_head];
        zf_sync_head = (zf_sync_head + 1) % ZF_SYNC_SLOTS;
        zf_sync_len--;
        zf_sync_busy = 1;
        pthread_mutex_unlock(&zf_sync_mu);
        int rc = job.datasync ? fdatasync((int)job.fh) : fsync((int)job.fh);
        reply(zf_fuse_fd, job.unique, rc == 0 ? 0 : errno, NULL, 0);
        pthread_mutex_lock(&zf_sync_mu);
        zf_sync_busy = 0;
        zf_count.fsyncs++;
        pthread_cond_broadcast(&zf_sync_idle);
    }
    pthread_mutex_unlock(&zf_sync_mu);
    return NULL;
}

static int fast_fsync(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_fsync_in *f = (const void *)(in + 1);
    if (n < sizeof *in + sizeof *f || file_of(f->fh) == NULL)
        return 0;
    pthread_mutex_lock(&zf_sync_mu);
    if (!zf_sync_started) {
        zf_fuse_fd = fd;
        zf_sync_started = pthread_create(&zf_sync_thread, NULL, sync_worker, NULL) == 0;
    }
    int queued = 0;
    if (zf_sync_started && !zf_sync_stop && zf_sync_len < ZF_SYNC_SLOTS) {
        zf_syncq[(zf_sync_head + zf_sync_len) % ZF_SYNC_SLOTS] =
            (struct zf_sync){f->fh, in->unique, (int)(f->fsync_flags & 1)};
        zf_sync_len++;
        pthread_cond_signal(&zf_sync_cv);
        queued = 1;
    }
    pthread_mutex_unlock(&zf_sync_mu);
    return queued;
}

void zf_shutdown(void)
{
    pthread_mutex_lock(&zf_sync_mu);
    zf_sync_stop = 1;
    pthread_cond_broadcast(&zf_sync_cv);
    int started = zf_sync_started;
    pthread_mutex_unlock(&zf_sync_mu);
    if (started)
        pthread_join(zf_sync_thread, NULL); /* after the queued ones are answered */
    zf_fast = 0;
    pthread_mutex_lock(&zf_pool_mu);
    while (zf_pool_n > 0)
        free(zf_pool[--zf_pool_n]);
    zf_pool_size = 0; /* records freed from now on are not pooled */
    pthread_mutex_unlock(&zf_pool_mu);
}

/* Nodes (kernel node ids) of regular files whose xattrs may be read here, each with the O_PATH
 * descriptor the daemon holds for it: an open-addressing table (linear probing, tombstones). */
struct zf_node {
    uint64_t node;
    int fd;
    uint8_t state; /* 0 empty, 1 used, 2 deleted */
    uint8_t kind;  /* ZF_NODE_FILE or ZF_NODE_DIR */
};
static struct zf_node *zf_nodes;
static size_t zf_nodes_cap, zf_nodes_used, zf_nodes_dead;

static size_t node_slot(uint64_t node, size_t cap)
{
    return (size_t)((node * 0x9E3779B97F4A7C15ull) >> 17) & (cap - 1);
}

static struct zf_node *node_find(uint64_t node)
{
    if (zf_nodes_cap == 0)
        return NULL;
    for (size_t i = node_slot(node, zf_nodes_cap);; i = (i + 1) & (zf_nodes_cap - 1)) {
        struct zf_node *e = &zf_nodes[i];
        if (e->state == 0)
            return NULL;
        if (e->state == 1 && e->node == node)
            return e;
    }
}

static int node_grow(void)
{
    size_t cap = zf_nodes_cap ? zf_nodes_cap * 2 : 4096;
    struct zf_node *old = zf_nodes, *t = calloc(cap, sizeof *t);
    if (t == NULL)
        return -1;
    for (size_t i = 0; i < zf_nodes_cap; i++) {
        if (old[i].state != 1)
            continue;
        size_t j = node_slot(old[i].node, cap);
        while (t[j].state)
            j = (j + 1) & (cap - 1);
        t[j] = old[i];
    }
    free(old);
    zf_nodes = t;
    zf_nodes_cap = cap;
    zf_nodes_dead = 0;
    return 0;
}

int zf_register_node(uint64_t node, int fd, int kind)
{
    struct zf_node *e = node_find(node);
    if (e != NULL) {
        e->fd = fd;
        e->kind = (uint8_t)kind;
        return 0;
    }
    if ((zf_nodes_used + zf_nodes_dead + 1) * 2 > zf_nodes_cap && node_grow() != 0)
        return -1;
    size_t i = node_slot(node, zf_nodes_cap);
    while (zf_nodes[i].state == 1)
        i = (i + 1) & (zf_nodes_cap - 1);
    if (zf_nodes[i].state == 2)
        zf_nodes_dead--;
    zf_nodes[i] = (struct zf_node){node, fd, 1, (uint8_t)kind};
    zf_nodes_used++;
    return 0;
}

void zf_unregister_node(uint64_t node)
{
    struct zf_node *e = node_find(node);
    if (e != NULL) {
        e->state = 2;
        zf_nodes_used--;
        zf_nodes_dead++;
    }
}

void zf_unregister_nodes(uint64_t keep)
{
    for (size_t i = 0; i < zf_nodes_cap; i++) {
        struct zf_node *e = &zf_nodes[i];
        if (e->state == 1 && e->node != keep) {
            e->state = 2;
            zf_nodes_used--;
            zf_nodes_dead++;
        }
    }
}

/* LOOKUP of a name that does not exist in a registered directory: "no such entry", as the
 * Python path answers (BackingVolume.lookup), but as an entry of node 0 with the entry
 * timeout, which the kernel keeps as a negative entry: the next lookups of the name (a PATH
 * search, an interpreter probing for modules) do not come back until then. That is safe
 * because the mount is the only writer of the backing directory (names it creates replace
 * the kernel's negative entries), and a restore in place, which renames behind the kernel,
 * invalidates every name it moves in. Only this answer is given here, and only when the
 * backing directory itself gives it; a name that exists (or any other error) goes to
 * Python, which keeps the table of objects the kernel knows. Creating a file costs a
 * negative LOOKUP first, so this saves one trip through Python per file created. */
static int fast_lookup(int fd, const struct fuse_in_header *in, size_t n)
{
    const char *name = (const char *)(in + 1);
    if (n <= sizeof *in + 1 || ((const char *)in)[n - 1] != '\0')
        return 0;
    struct zf_node *e = node_find(in->nodeid);
    if (e == NULL || e->kind != ZF_NODE_DIR)
        return 0;
    struct stat st;
    if (fstatat(e->fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 || errno != ENOENT)
        return 0;
    struct fuse_entry_out out;
    memset(&out, 0, sizeof out);  /* nodeid 0: no such entry, for entry_valid seconds */
    out.entry_valid = ZF_ATTR_TIMEOUT;
    reply(fd, in->unique, 0, &out, sizeof out);
    zf_count.lookups++;
    return 1;
}

/* RELEASE of a registered file: answered at once; the descriptor (which is the handle) is
 * closed by Python when it next takes the list (zf_take_released), so its number cannot be
 * given to another file before Python has forgotten it. */
static uint64_t *zf_released;
static size_t zf_released_len, zf_released_cap;

static int fast_release(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_release_in *r = (const void *)(in + 1);
    if (n < sizeof *in + sizeof *r || file_of(r->fh) == NULL ||
        (r->release_flags & FUSE_RELEASE_FLOCK_UNLOCK))
        return 0;
    if (zf_released_len == zf_released_cap) {
        size_t cap = zf_released_cap ? zf_released_cap * 2 : 256;
        uint64_t *t = realloc(zf_released, cap * sizeof *t);
        if (t == NULL)
            return 0;
        zf_released = t;
        zf_released_cap = cap;
    }
    zf_released[zf_released_len++] = r->fh;
    zf_files[r->fh].used = 0;
    reply(fd, in->unique, 0, NULL, 0);
    zf_count.releases++;
    return 1;
}

size_t zf_take_released(uint64_t *out, size_t max)
{
    size_t k = zf_released_len < max ? zf_released_len : max;
    memcpy(out, zf_released + zf_released_len - k, k * sizeof *out);
    zf_released_len -= k;
    return k;
}

/* GETXATTR of a registered regular file, from the backing file: the kernel asks for
 * security.capability before the first write to every inode, among others. */
static int fast_getxattr(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_getxattr_in *g = (const void *)(in + 1);
    const char *name = (const char *)(g + 1);
    if (n < sizeof *in + sizeof *g + 1 || ((const char *)in)[n - 1] != '\0')
        return 0;
    struct zf_node *e = node_find(in->nodeid);
    if (e == NULL || e->kind != ZF_NODE_FILE || g->size > (64u << 10))
        return 0;
    char path[40];
    snprintf(path, sizeof path, "/proc/self/fd/%d", e->fd);
    if (g->size > zf_rbuf_cap) {
        uint8_t *b = realloc(zf_rbuf, g->size);
        if (b == NULL)
            return 0;
        zf_rbuf = b;
        zf_rbuf_cap = g->size;
    }
    ssize_t got = getxattr(path, name, g->size ? zf_rbuf : NULL, g->size);
    if (got < 0) {
        reply(fd, in->unique, errno, NULL, 0);
    } else if (g->size == 0) {
        struct fuse_getxattr_out out = {.size = (uint32_t)got};
        reply(fd, in->unique, 0, &out, sizeof out);
    } else {
        reply(fd, in->unique, 0, zf_rbuf, (size_t)got);
    }
    zf_count.getxattrs++;
    return 1;
}

/* fallocate(2), which pyfuse3 has no handler for (the kernel would answer EOPNOTSUPP): done on
 * the backing descriptor and recorded; the record is tiny, so the memory limit does not apply. */
static int fast_fallocate(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_fallocate_in *a = (const void *)(in + 1);
    if (n < sizeof *in + sizeof *a)
        return 0;
    struct zf_file *f = file_of(a->fh);
    if (f == NULL || zf_frozen)
        return 0;
    struct stat st;
    if (f->capture)
        (void)mark_fast(f);
    if (fallocate((int)a->fh, (int)a->mode, (off_t)a->offset, (off_t)a->length) != 0 ||
        fstat((int)a->fh, &st) != 0) {
        reply(fd, in->unique, errno, NULL, 0);
        return 1;
    }
    if (f->capture) {
        zf_rec rec = {.kind = ZF_FALLOCATE, .mode = a->mode, .ident = f->ident,
                      .offset = a->offset, .len = a->length, .mtime_ns = ns_of(st.st_mtim)};
        if (push(rec) != 0) {
            reply(fd, in->unique, EIO, NULL, 0);
            return 1;
        }
    }
    reply(fd, in->unique, 0, NULL, 0);
    zf_count.fallocates++;
    return 1;
}

/* SEEK_DATA/SEEK_HOLE, which pyfuse3 has no handler for: answered from the backing file. */
static int fast_lseek(int fd, const struct fuse_in_header *in, size_t n)
{
    const struct fuse_lseek_in *l = (const void *)(in + 1);
    if (n < sizeof *in + sizeof *l || file_of(l->fh) == NULL)
        return 0;
    off_t at = lseek((int)l->fh, (off_t)l->offset, (int)l->whence);
    if (at < 0) {
        reply(fd, in->unique, errno, NULL, 0);
    } else {
        struct fuse_lseek_out out = {.offset = (uint64_t)at};
        reply(fd, in->unique, 0, &out, sizeof out);
    }
    return 1;
}

/* The buffer to read the next request into: zf_inbuf, (re)allocated, or libfuse's. */
static uint8_t *request_buffer(uint8_t *buf, size_t len)
{
    if (!zf_fast)
        return buf;
    if (zf_inbuf != NULL && zf_inbuf_cap >= len)
        return zf_inbuf;
    free(zf_inbuf);
    zf_inbuf = NULL;
    pthread_mutex_lock(&zf_pool_mu);
    if (zf_pool_size != len) { /* libfuse's buffer size changed: the pooled ones are stale */
        while (zf_pool_n > 0)
            free(zf_pool[--zf_pool_n]);
        zf_pool_size = len;
    }
    if (zf_pool_n > 0) {
        zf_inbuf = zf_pool[--zf_pool_n];
        zf_count.buffers_reused++;
    }
    pthread_mutex_unlock(&zf_pool_mu);
    if (zf_inbuf == NULL) {
        zf_inbuf = malloc(len);
        zf_count.buffers_new++;
    }
    zf_inbuf_cap = zf_inbuf != NULL ? len : 0;
    return zf_inbuf != NULL ? zf_inbuf : buf;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return ns_of(t);
}

static ssize_t read_and_serve(int fd, void *buf, size_t len)
{
    const uint64_t start = now_ns();
    for (;;) {
        uint8_t *mem = request_buffer(buf, len);
        ssize_t n = read(fd, mem, len);
        if (n < 0 && errno == EAGAIN) {
            /* The descriptor is non-blocking (zf_install): another reader took the request
             * this one was woken for. libfuse passes EINTR on as "try again". */
            errno = EINTR;
            return -1;
        }
        if (n < (ssize_t)sizeof(struct fuse_in_header)) {
            if (mem != buf && n > 0)
                memcpy(buf, mem, (size_t)n);
            return n;
        }
        const struct fuse_in_header *in = (const void *)mem;
        if (!zf_init_seen && in->opcode == FUSE_INIT &&
            (size_t)n >= sizeof *in + 4 * sizeof(uint32_t)) {
            const struct fuse_init_in *arg = (const void *)(in + 1);
            zf_offered = arg->flags;
            zf_init_unique = in->unique;
            zf_init_seen = 1;
        }
        int handled = 0;
        int mutating = in->opcode == FUSE_WRITE || in->opcode == FUSE_SETATTR ||
                       in->opcode == FUSE_FALLOCATE;
        if (mutating && zf_run != NULL)
            __atomic_store_n(&zf_run[3], 1, __ATOMIC_RELAXED);
        if (zf_fast && in->total_extlen == 0) {
            switch (in->opcode) {
            case FUSE_WRITE: handled = fast_write(fd, in, (size_t)n); break;
            case FUSE_READ: handled = fast_read(fd, in, (size_t)n); break;
            case FUSE_SETATTR: handled = fast_setattr(fd, in, (size_t)n); break;
            case FUSE_FSYNC: handled = fast_fsync(fd, in, (size_t)n); break;
            case FUSE_LSEEK: handled = fast_lseek(fd, in, (size_t)n); break;
            case FUSE_GETXATTR: handled = fast_getxattr(fd, in, (size_t)n); break;
            case FUSE_FALLOCATE: handled = fast_fallocate(fd, in, (size_t)n); break;
            case FUSE_LOOKUP: handled = fast_lookup(fd, in, (size_t)n); break;
            case FUSE_RELEASE: handled = fast_release(fd, in, (size_t)n); break;
            default: break;
            }
        }
        if (mutating && zf_run != NULL)
            __atomic_store_n(&zf_run[3], 0, __ATOMIC_RELAXED);
        if (!handled) {
            if (mem != buf)
                memcpy(buf, mem, (size_t)n); /* for libfuse and pyfuse3 */
            return n;
        }
        /* Answer whatever else arrives within ZF_LINGER_NS (an application waiting for each
         * answer sends its next request a few microseconds later; returning to the event loop
         * and back costs it tens of microseconds), for at most ZF_BUDGET_NS in all, unless a
         * frame's worth of writes waits for the capture stream. Otherwise let the event loop
         * run (libfuse turns EINTR into "nothing read, try again"). */
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (zf_signalled || now_ns() - start > ZF_BUDGET_NS) {
            errno = EINTR;
            return -1;
        }
        int ready = 0;
        if (zf_spin_skip > 0) {
            zf_spin_skip--;
        } else {
            const uint64_t spin_until = now_ns() + ZF_SPIN_NS;
            do {
                const struct timespec zero = {0, 0};
                ready = ppoll(&p, 1, &zero, NULL) == 1 && (p.revents & POLLIN);
            } while (!ready && now_ns() < spin_until);
            if (!ready)
                zf_spin_skip = ZF_SPIN_BACKOFF;
        }
        if (!ready) {
            const struct timespec linger = {0, ZF_LINGER_NS - ZF_SPIN_NS};
            if (ppoll(&p, 1, &linger, NULL) != 1 || !(p.revents & POLLIN)) {
                errno = EINTR;
                return -1;
            }
        }
    }
}

static ssize_t zf_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    /* pyfuse3 receives with the GIL held; reading a request (the kernel copies up to 1 MiB
     * here) and serving the fast-path ones need no Python, and everything they touch belongs
     * to this, the event-loop, thread. Releasing the GIL lets the capture threads work. */
    PyThreadState *ts = PyGILState_Check() ? PyEval_SaveThread() : NULL;
    ssize_t n = read_and_serve(fd, buf, len);
    int err = errno;
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    errno = err;
    return n;
}

static ssize_t zf_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (zf_init_seen && !zf_reply_seen && count >= 2 &&
        iov[0].iov_len == sizeof(struct fuse_out_header) &&
        iov[1].iov_len >= 4 * sizeof(uint32_t)) {
        struct fuse_out_header *out = iov[0].iov_base;
        if (out->unique == zf_init_unique) {
            zf_reply_seen = 1;
            if (out->error == 0) {
                struct fuse_init_out *arg = iov[1].iov_base;
                zf_added = zf_offered & FUSE_HANDLE_KILLPRIV_V2;
                arg->flags |= zf_added;
            }
        }
    }
    return writev(fd, iov, count);
}

int zf_install(int eventfd, int fast, size_t limit)
{
    if (zf_session == NULL)
        return -1; /* fuse_session_new was not interposed: pyfuse3 was loaded first */
    struct fuse_custom_io io;
    memset(&io, 0, sizeof io);
    io.read = zf_read;
    io.writev = zf_writev;
    int fd = fuse_session_fd(zf_session);
    int rc = fuse_session_custom_io(zf_session, &io, fd);
    if (rc == 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0)
            (void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        zf_fd = fd;
        zf_eventfd = eventfd;
        zf_fast = fast;
        zf_limit = limit;
    }
    return rc;
}

int zf_killpriv_v2(void) { return zf_added != 0; }

int zf_wait_request(int timeout_us)
{
    if (zf_fd < 0 || zf_signalled)
        return 0; /* a frame's worth of writes waits for the event loop */
    struct pollfd p = {.fd = zf_fd, .events = POLLIN};
    const struct timespec t = {0, (long)timeout_us * 1000};
    return ppoll(&p, 1, &t, NULL) == 1 && (p.revents & POLLIN);
}

int zf_exited(void) { return zf_session == NULL || fuse_session_exited(zf_session); }

int zf_register(uint64_t fh, uint64_t ident, uint32_t uid, int capture)
{
    if (fh >= zf_files_cap) {
        size_t cap = zf_files_cap ? zf_files_cap : 1024;
        while (cap <= fh)
            cap *= 2;
        struct zf_file *t = realloc(zf_files, cap * sizeof *t);
        if (t == NULL)
            return -1;
        memset(t + zf_files_cap, 0, (cap - zf_files_cap) * sizeof *t);
        zf_files = t;
        zf_files_cap = cap;
    }
    zf_files[fh] = (struct zf_file){ident, uid, 1, (uint8_t)(capture != 0)};
    return 0;
}

void zf_unregister(uint64_t fh)
{
    if (fh < zf_files_cap)
        zf_files[fh].used = 0;
}

size_t zf_pending(void) { return zf_qlen; }

size_t zf_take(zf_rec *out, size_t max) { return zf_take_upto(out, max, SIZE_MAX, NULL); }

size_t zf_take_upto(zf_rec *out, size_t max, size_t max_bytes, uint64_t *data_bytes)
{
    size_t n = 0, bytes = 0, data = 0;
    while (n < zf_qlen && n < max && (n == 0 || data < max_bytes)) {
        bytes += zf_queue[n].len;
        if (zf_queue[n].kind == ZF_WRITE)
            data += zf_queue[n].len;
        n++;
    }
    if (data_bytes != NULL)
        *data_bytes = data;
    memcpy(out, zf_queue, n * sizeof *out);
    memmove(zf_queue, zf_queue + n, (zf_qlen - n) * sizeof *zf_queue);
    zf_qlen -= n;
    __atomic_store_n(&zf_qbytes, zf_qbytes - bytes, __ATOMIC_RELAXED);
    if (zf_qlen == 0)
        zf_signalled = 0;
    return n;
}

void zf_set_frozen(int frozen) { zf_frozen = frozen; }

void zf_set_run_counter(uint64_t *run) { zf_run = run; }

void zf_set_dirty_table(uint64_t *dirty) { zf_dirty = dirty; }

void zf_set_wake_on_record(int on) { zf_signal_at = on ? 0 : 4u << 20; }

/* Called on the event-loop thread only (fast path and Python handlers alike), so the table has
 * one writer. A kill between two stores must never hide a change: a new slot gets its marks
 * before its ident (a torn slot marks its old ident, not yet changed files), and every mark is
 * made before the backing file changes. */
int zf_mark_dirty(uint64_t ident, uint64_t fast_mark, uint64_t seq_mark)
{
    if (zf_dirty == NULL)
        return -1;
    uint64_t *slots = zf_dirty + 8;
    const uint64_t fast_done = zf_dirty[0], seq_done = zf_dirty[1];
    const size_t mask = ZF_DIRTY_SLOTS - 1;
    size_t at = (size_t)((ident * 0x9E3779B97F4A7C15ull) >> 55) & mask;
    uint64_t *free_slot = NULL;
    for (size_t probe = 0; probe < 32; probe++) {
        uint64_t *slot = slots + 3 * ((at + probe) & mask);
        if (slot[0] == ident) {
            if (fast_mark)
                slot[1] = fast_mark;
            if (seq_mark)
                slot[2] = seq_mark;
            return 0;
        }
        if (free_slot == NULL && (slot[0] == 0 || (slot[1] <= fast_done && slot[2] <= seq_done)))
            free_slot = slot;
    }
    if (free_slot == NULL) {
        zf_dirty[3] = 1;
        return -1;
    }
    free_slot[1] = fast_mark;
    free_slot[2] = seq_mark;
    __atomic_store_n(&free_slot[0], ident, __ATOMIC_RELEASE);
    return 0;
}

/* Before the fast path changes a captured file: the record it will queue is number
 * zf_run[0] + 1. */
static int mark_fast(const struct zf_file *f)
{
    if (zf_dirty == NULL || zf_run == NULL)
        return 0;
    return zf_mark_dirty(f->ident, __atomic_load_n(&zf_run[0], __ATOMIC_RELAXED) + 1, 0);
}

void zf_add_held(int64_t delta) { __atomic_add_fetch(&zf_held_elsewhere, delta, __ATOMIC_RELAXED); }

void zf_free(void *p)
{
    /* Only kept request buffers are as large as zf_pool_size: the fast path copies writes
     * below ZF_KEEP_MIN, and no write is larger than a request. */
    if (p != NULL && malloc_usable_size(p) >= zf_pool_size && zf_pool_size > 0) {
        pthread_mutex_lock(&zf_pool_mu);
        /* pooled and captured bytes together stay within the limit: the pool only takes
         * the room the capture stream's buffers leave (writes the Python path captured,
         * in bytes of its own, leave none) */
        size_t captured = __atomic_load_n(&zf_qbytes, __ATOMIC_RELAXED) + held_elsewhere();
        if (malloc_usable_size(p) >= zf_pool_size && zf_pool_n < ZF_POOL_MAX &&
            (zf_pool_n + 1) * zf_pool_size + captured <= zf_limit) {
            zf_pool[zf_pool_n++] = p;
            p = NULL;
        }
        pthread_mutex_unlock(&zf_pool_mu);
    }
    free(p);
}

zf_counters zf_counts(void) { return zf_count; }
