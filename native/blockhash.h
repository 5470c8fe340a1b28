/*
 * Block hashing for zfsrep: XXH3-128 digests of fixed-size blocks, computed
 * over whole buffers per call (never one block per call).
 *
 * Digests are 16-byte canonical (big-endian) XXH3-128 values, identical to
 * what XXH128_canonicalFromHash() produces and to xxhash.xxh3_128_digest()
 * in Python. A buffer of len bytes has ceil(len / block_size) blocks; the
 * last one may be shorter and is hashed as its own shorter input.
 *
 * All functions are thread-safe and touch no global state after load.
 */
#ifndef ZFSREP_BLOCKHASH_H
#define ZFSREP_BLOCKHASH_H

#include <stddef.h>
#include <stdint.h>

#define ZB_DIGEST_SIZE 16

/* Writes one digest per block into out (ceil(len/block_size) * 16 bytes).
 * Returns the number of blocks; 0 for len == 0 or block_size == 0. */
size_t zb_hash_blocks(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out);

/* Writes into out_idx (room for ceil(len/block_size) entries) the indices of
 * blocks whose digest differs from digests[i]; a block with i >= ndigests
 * always differs (and is not hashed). Returns the number of indices. */
size_t zb_diff_blocks(const uint8_t *buf, size_t len, size_t block_size,
                      const uint8_t *digests, size_t ndigests, size_t *out_idx);

/* out_flags[i] = 1 if block i is all zero bytes, else 0. Returns the number
 * of blocks. */
size_t zb_zero_blocks(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out_flags);

/* Canonical XXH3-128 of the whole buffer. */
void zb_digest(const uint8_t *buf, size_t len, uint8_t out[16]);

/* Canonical XXH3-128 of the concatenation of n buffers (ptrs[i], lens[i]),
 * equal to zb_digest of the joined bytes, without joining them. */
void zb_digest_parts(const uint8_t *const *ptrs, const size_t *lens, size_t n, uint8_t out[16]);

/* Writes the concatenation of n parts (ptrs[i], lens[i]) to file descriptor fd from
 * byte offset on (pwritev, short writes continued) and puts their canonical XXH3-128,
 * equal to zb_digest_parts of the same parts, in out. Where digests[i] is not NULL,
 * part i is also hashed block by block (block_size) into digests[i] (room for
 * ceil(lens[i] / block_size) digests), and a later part may be that digest buffer.
 * Parts are taken in pieces of `piece` bytes (a multiple of block_size), each hashed,
 * checksummed and handed to the kernel while still in the CPU's cache: one pass over the
 * data from memory instead of three. Returns 0, or the errno of a failed write (then
 * how much was written is unknown) or EINVAL for a bad piece size. */
int zb_write_parts(int fd, int64_t offset, const uint8_t *const *ptrs, const size_t *lens,
                   uint8_t *const *digests, size_t n, size_t block_size, size_t piece,
                   uint8_t out[16]);

/* The same pass as zb_write_parts, but the parts are copied one after another into dst
 * (room for the sum of lens) instead of written to a file: for a file opened with
 * O_DIRECT, whose writes must come from an aligned buffer. Returns 0, or EINVAL for a
 * bad piece size. */
int zb_stage_parts(uint8_t *dst, const uint8_t *const *ptrs, const size_t *lens,
                   uint8_t *const *digests, size_t n, size_t block_size, size_t piece,
                   uint8_t out[16]);

/* Name of the XXH3 kernel chosen at load time: "avx512", "avx2" or "default"
 * (the header's compile-time choice: SSE2 on x86_64, NEON on aarch64, ...),
 * or "shared"/"shared-dispatch" when built against libxxhash.so. The
 * environment variable ZFSREP_XXH3_KERNEL=avx2|default, read at load time,
 * caps the choice (for tests and benchmarks). */
const char *zb_kernel(void);

#endif /* ZFSREP_BLOCKHASH_H */
