#ifndef ZFSREP_FUSEHOOK_H
#define ZFSREP_FUSEHOOK_H
#include <stddef.h>
#include <stdint.h>

/* A record made by the fast path, waiting for the capture stream: a write (its data lies in
 * owner, a malloc'd block the taker frees with zf_free) or the attributes after a times-only
 * SETATTR, or a fallocate. */
enum { ZF_WRITE = 0, ZF_SETATTR = 1, ZF_FALLOCATE = 2 };
typedef struct {
    uint32_t kind;
    uint32_t mode;
    uint32_t uid;
    uint32_t gid;
    uint64_t ident;
    uint64_t offset;
    uint64_t mtime_ns;
    uint8_t *data;
    uint8_t *owner;
    size_t len;
} zf_rec;

typedef struct {
    uint64_t reads;
    uint64_t writes;
    uint64_t fsyncs;
    uint64_t setattrs;
    uint64_t getxattrs;
    uint64_t fallocates;
    uint64_t lookups;  /* negative ones */
    uint64_t releases;
    uint64_t buffers_new;     /* request buffers allocated while the fast path was on */
    uint64_t buffers_reused;  /* ... and taken from the pool instead */
} zf_counters;

enum { ZF_NODE_FILE = 1, ZF_NODE_DIR = 2 };

/* Hook the session pyfuse3.init() created: 0 on success. eventfd (or -1) is signalled when
 * queued writes should be drained; fast enables the READ/WRITE fast path; limit bounds the
 * captured bytes (queue + zf_add_held) the fast path may reach. */
int zf_install(int eventfd, int fast, size_t limit);
/* 1 once the kernel accepted FUSE_HANDLE_KILLPRIV_V2 (after the INIT exchange). */
int zf_killpriv_v2(void);
/* 1 if a request arrives on the session's descriptor within timeout_us (0: at once) and
 * the queue does not wait for the event loop. */
int zf_wait_request(int timeout_us);
/* 1 once the session was told to exit (or there is none). */
int zf_exited(void);
int zf_register(uint64_t fh, uint64_t ident, uint32_t uid, int capture);
void zf_unregister(uint64_t fh);
/* Let the fast path use kernel node ``node`` through its O_PATH descriptor ``fd``: read the
 * xattrs of a regular file (ZF_NODE_FILE), answer LOOKUPs of absent names in a directory
 * (ZF_NODE_DIR). */
int zf_register_node(uint64_t node, int fd, int kind);
void zf_unregister_node(uint64_t node);
/* Forget every node but ``keep`` (the tree was replaced by a restore in place). */
void zf_unregister_nodes(uint64_t keep);
/* The handles whose RELEASE the fast path answered, for Python to close; at most max, the
 * number returned. */
size_t zf_take_released(uint64_t *out, size_t max);
size_t zf_pending(void);
size_t zf_take(zf_rec *out, size_t max);
/* zf_take, but only while the write data taken is under max_bytes (at least one record);
 * the write data bytes taken go to *data_bytes (if not NULL). */
size_t zf_take_upto(zf_rec *out, size_t max, size_t max_bytes, uint64_t *data_bytes);
/* Captured bytes held outside the queue (batched, encoding, being written) grow or shrink by
 * delta; callable from any thread. */
void zf_add_held(int64_t delta);
void zf_free(void *p);
/* Keep the fast path's part of the spool's run state (zfsrep.spool.RunState) in run, four
 * uint64_t in a shared mapping of the run-state file, so that a restart after the daemon died
 * can tell whether changes were lost: run[0] counts every record the fast path queues,
 * before its request is answered; run[3] is 1 while a WRITE, SETATTR or FALLOCATE is served
 * here. NULL stops. Call on the event-loop thread. */
void zf_set_run_counter(uint64_t *run);
/* The spool's table of files with changes not yet in the spool, which a restart after a crash
 * records again (zfsrep.spool.RunState): dirty[0] fast-path records in written frames and
 * dirty[1] the last seq written (both kept by the capture stream), dirty[3] set when an ident
 * found no slot; ZF_DIRTY_SLOTS slots of (ident, fast-path mark, seq mark) from dirty[8].
 * NULL: no table. */
enum { ZF_DIRTY_SLOTS = 512 };
void zf_set_dirty_table(uint64_t *dirty);
/* Signal the eventfd at the first record queued (1), or once a frame's worth is (0). */
void zf_set_wake_on_record(int on);
/* Mark ident as changed by the fast path's record number fast_mark (its count of queued
 * records once that one is queued), or by the record with sequence number seq_mark (set, not
 * raised, when nonzero); 0 leaves a mark as it is. Returns 0, or -1 if the table is full
 * (or absent): the restart then cannot tell which files to record again. */
int zf_mark_dirty(uint64_t ident, uint64_t fast_mark, uint64_t seq_mark);
/* While frozen (a checkpoint barrier), WRITE, SETATTR and FALLOCATE go to Python, which holds
 * their answers; call on the event-loop thread. */
void zf_set_frozen(int frozen);
zf_counters zf_counts(void);
/* Answer the queued FSYNCs, stop the fsync worker and the fast path (before unmounting). */
void zf_shutdown(void);
#endif
