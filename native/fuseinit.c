/*
 * Negotiate FUSE_HANDLE_KILLPRIV_V2 for a pyfuse3 session (zfsrep._fuseinit).
 *
 * Why: unless the filesystem takes over killing set-id bits and capabilities
 * (FUSE_HANDLE_KILLPRIV_V2), the kernel does not mark the superblock SB_NOSEC, and then
 * every write(2) through the mount first asks the daemon for the file's
 * "security.capability" xattr: one synchronous round trip per write, which made 4 KiB
 * buffered writes through the protected mount 10x slower than the backing directory.
 * libfuse 3.14 (Debian 12) predates the flag, and pyfuse3 exposes no way to set
 * connection flags, so this module adds it to the INIT reply itself:
 *
 *  - fuse_session_new() is interposed (this library is loaded RTLD_GLOBAL before pyfuse3,
 *    so pyfuse3's reference binds here) only to remember the session;
 *  - zf_install() gives that session custom read/writev functions that behave exactly
 *    like read(2)/writev(2), except that the reply to the kernel's INIT request gets
 *    FUSE_HANDLE_KILLPRIV_V2 added when the kernel offered it.
 *
 * The daemon then kills set-id bits itself (zfsrep/volume.py); the backing filesystem
 * already removes security.capability on every write and truncate.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/fuse.h>

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include "fuseinit.h"

#ifndef FUSE_HANDLE_KILLPRIV_V2
#define FUSE_HANDLE_KILLPRIV_V2 (1u << 28)
#endif

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t,
                                               void *);

static struct fuse_session *zf_session;
static uint64_t zf_init_unique;
static int zf_init_seen;
static uint32_t zf_offered;
static uint32_t zf_added;
static int zf_reply_seen;

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

static ssize_t zf_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    if (!zf_init_seen &&
        n >= (ssize_t)(sizeof(struct fuse_in_header) + 4 * sizeof(uint32_t))) {
        const struct fuse_in_header *in = buf;
        if (in->opcode == FUSE_INIT) {
            const struct fuse_init_in *arg = (const void *)(in + 1);
            zf_offered = arg->flags;
            zf_init_unique = in->unique;
            zf_init_seen = 1;
        }
    }
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

int zf_install(void)
{
    if (zf_session == NULL)
        return -1; /* fuse_session_new was not interposed: pyfuse3 loaded first */
    struct fuse_custom_io io;
    memset(&io, 0, sizeof io);
    io.read = zf_read;
    io.writev = zf_writev;
    return fuse_session_custom_io(zf_session, &io, fuse_session_fd(zf_session));
}

int zf_killpriv_v2(void)
{
    return zf_added != 0;
}
