/*
 * Block hashing on the system libxxhash (libxxhash-dev), see blockhash.h.
 *
 * Two ways of using the library, chosen at build time (native/build_blockhash.py):
 *
 * - default, header-only inline build: XXH_INLINE_ALL + <xxhash.h>. The header
 *   picks its vector code at compile time (SSE2 on plain x86_64), so on x86 with
 *   GCC/clang we also compile AVX2 and AVX-512 variants of the long-input loop
 *   with target attributes (the same hooks, XXH_DISPATCH_AVX2/XXH_TARGET_AVX2,
 *   that xxHash's own x86 dispatcher uses) and pick one at load time with
 *   __builtin_cpu_supports. No -march flags are needed, so the build runs on
 *   any x86_64. The variants call internal functions of xxhash.h whose
 *   signatures changed in 0.8.2, so they are compiled only for the header
 *   versions checked below; any other version uses the header's default path.
 *
 * - ZB_SHARED_LIBXXHASH: link libxxhash.so and call XXH3_128bits, or
 *   XXH3_128bits_dispatch when the library exports it (Debian's amd64 build
 *   does); a weak reference makes that optional at run time.
 *
 * On the Debian 12 development machine (AVX-512) the inline build measured
 * 10-20 % faster than the shared library's own dispatch, in and out of cache
 * (bench/bench_hash.py), and it needs no run-time library, hence the default.
 * ZB_NO_DISPATCH keeps the inline build but skips the AVX variants.
 */
#include "blockhash.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* x86_64 only: there SSE2 is the baseline that XXH_X86DISPATCH's code assumes. */
#if !defined(ZB_SHARED_LIBXXHASH) && !defined(ZB_NO_DISPATCH) && defined(__x86_64__) \
    && (defined(__GNUC__) || defined(__clang__))
#define ZB_X86 1
#include <immintrin.h>
#define XXH_X86DISPATCH /* 64-byte accumulator alignment, SSE2 code always present */
#define XXH_DISPATCH_AVX2 1
#define XXH_TARGET_AVX2 __attribute__((target("avx2")))
#define XXH_DISPATCH_AVX512 1
#define XXH_TARGET_AVX512 __attribute__((target("avx512f")))
#else
#define ZB_X86 0
#endif

#ifndef ZB_SHARED_LIBXXHASH
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

typedef XXH128_hash_t (*zb_hash_fn)(const void *, size_t);
typedef void (*zb_update_fn)(XXH3_state_t *, const void *, size_t);

static XXH128_hash_t hash_default(const void *p, size_t n)
{
    return XXH3_128bits(p, n);
}

static void update_default(XXH3_state_t *state, const void *p, size_t n)
{
    XXH3_128bits_update(state, p, n);
}

static zb_hash_fn zb_hash = hash_default;
static zb_update_fn zb_update = update_default;
static const char *zb_kernel_name = "default";

#if ZB_X86 && XXH_VERSION_NUMBER == 801
/* Inputs above 240 bytes go to a "hashLong" function; these are the header's
 * own default hashLong with the vector kernels named explicitly. */
#define ZB_HASHLONG(name, isa, acc, scramble)                                            \
    __attribute__((noinline, target(isa))) static XXH128_hash_t name(                    \
        const void *XXH_RESTRICT p, size_t n, XXH64_hash_t seed,                         \
        const void *XXH_RESTRICT secret, size_t secret_len)                              \
    {                                                                                    \
        (void)seed;                                                                      \
        (void)secret;                                                                    \
        (void)secret_len;                                                                \
        return XXH3_hashLong_128b_internal(p, n, XXH3_kSecret, sizeof(XXH3_kSecret), acc, \
                                           scramble);                                    \
    }

ZB_HASHLONG(hashlong_avx2, "avx2", XXH3_accumulate_512_avx2, XXH3_scrambleAcc_avx2)
ZB_HASHLONG(hashlong_avx512, "avx512f", XXH3_accumulate_512_avx512, XXH3_scrambleAcc_avx512)

static XXH128_hash_t hash_avx2(const void *p, size_t n)
{
    return XXH3_128bits_internal(p, n, 0, XXH3_kSecret, sizeof(XXH3_kSecret), hashlong_avx2);
}

static XXH128_hash_t hash_avx512(const void *p, size_t n)
{
    return XXH3_128bits_internal(p, n, 0, XXH3_kSecret, sizeof(XXH3_kSecret), hashlong_avx512);
}

/* The streaming update with the vector kernels named explicitly (the kernels compute the
 * same accumulators, so a stream gives the digest of the one-shot call). */
__attribute__((noinline, target("avx2"))) static void update_avx2(XXH3_state_t *state,
                                                                  const void *p, size_t n)
{
    XXH3_update(state, (const xxh_u8 *)p, n, XXH3_accumulate_512_avx2, XXH3_scrambleAcc_avx2);
}

__attribute__((noinline, target("avx512f"))) static void update_avx512(XXH3_state_t *state,
                                                                       const void *p, size_t n)
{
    XXH3_update(state, (const xxh_u8 *)p, n, XXH3_accumulate_512_avx512,
                XXH3_scrambleAcc_avx512);
}

/* Runs when the shared object is loaded, before any call, so zb_hash is never
 * written while another thread reads it. __builtin_cpu_supports also checks
 * that the OS saves the AVX/AVX-512 register state. ZFSREP_XXH3_KERNEL=avx2 or
 * =default caps the choice, so tests can exercise every kernel on one machine. */
__attribute__((constructor)) static void zb_select_kernel(void)
{
    const char *cap = getenv("ZFSREP_XXH3_KERNEL");
    int allow_avx512 = cap == NULL || *cap == '\0' || strcmp(cap, "avx512") == 0;
    int allow_avx2 = allow_avx512 || strcmp(cap, "avx2") == 0;

    __builtin_cpu_init();
    if (allow_avx512 && __builtin_cpu_supports("avx512f")) {
        zb_hash = hash_avx512;
        zb_update = update_avx512;
        zb_kernel_name = "avx512";
    } else if (allow_avx2 && __builtin_cpu_supports("avx2")) {
        zb_hash = hash_avx2;
        zb_update = update_avx2;
        zb_kernel_name = "avx2";
    }
}

#elif defined(ZB_SHARED_LIBXXHASH) && defined(__GNUC__) && defined(__ELF__)
/* Exported by libxxhash builds that include xxh_x86dispatch.c; NULL otherwise. */
extern XXH128_hash_t XXH3_128bits_dispatch(const void *, size_t) __attribute__((weak));

__attribute__((constructor)) static void zb_select_kernel(void)
{
    zb_kernel_name = "shared";
    if (XXH3_128bits_dispatch != NULL) {
        zb_hash = XXH3_128bits_dispatch;
        zb_kernel_name = "shared-dispatch";
    }
}
#endif

const char *zb_kernel(void)
{
    return zb_kernel_name;
}

static inline void put_digest(const uint8_t *p, size_t n, uint8_t *out)
{
    XXH128_canonicalFromHash((XXH128_canonical_t *)(void *)out, zb_hash(p, n));
}

size_t zb_hash_blocks(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out)
{
    size_t i = 0;
    if (block_size == 0)
        return 0;
    for (size_t off = 0; off < len; off += block_size, i++) {
        size_t n = len - off < block_size ? len - off : block_size;
        put_digest(buf + off, n, out + i * ZB_DIGEST_SIZE);
    }
    return i;
}

size_t zb_diff_blocks(const uint8_t *buf, size_t len, size_t block_size,
                      const uint8_t *digests, size_t ndigests, size_t *out_idx)
{
    size_t i = 0, count = 0;
    uint8_t d[ZB_DIGEST_SIZE];
    if (block_size == 0)
        return 0;
    for (size_t off = 0; off < len; off += block_size, i++) {
        size_t n = len - off < block_size ? len - off : block_size;
        if (i < ndigests) {
            put_digest(buf + off, n, d);
            if (memcmp(d, digests + i * ZB_DIGEST_SIZE, ZB_DIGEST_SIZE) == 0)
                continue;
        }
        out_idx[count++] = i;
    }
    return count;
}

/* A block is zero iff its first 16 bytes are zero and every byte equals the
 * byte 16 places later; glibc's vectorised memcmp checks the latter at close
 * to memory speed and stops at the first difference. */
static int block_is_zero(const uint8_t *p, size_t n)
{
    uint64_t a, b;
    if (n < 16) {
        uint8_t acc = 0;
        for (size_t k = 0; k < n; k++)
            acc |= p[k];
        return acc == 0;
    }
    memcpy(&a, p, 8);
    memcpy(&b, p + 8, 8);
    if (a | b)
        return 0;
    return memcmp(p, p + 16, n - 16) == 0;
}

size_t zb_zero_blocks(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out_flags)
{
    size_t i = 0;
    if (block_size == 0)
        return 0;
    for (size_t off = 0; off < len; off += block_size, i++) {
        size_t n = len - off < block_size ? len - off : block_size;
        out_flags[i] = (uint8_t)block_is_zero(buf + off, n);
    }
    return i;
}

void zb_digest(const uint8_t *buf, size_t len, uint8_t out[16])
{
    put_digest(buf, len, out);
}

void zb_digest_parts(const uint8_t *const *ptrs, const size_t *lens, size_t n, uint8_t out[16])
{
    XXH3_state_t state;
    XXH3_INITSTATE(&state);
    XXH3_128bits_reset(&state);
    for (size_t i = 0; i < n; i++)
        zb_update(&state, ptrs[i], lens[i]);
    XXH128_canonicalFromHash((XXH128_canonical_t *)(void *)out, XXH3_128bits_digest(&state));
}

/* Pieces waiting to be written, and where the next byte goes. */
struct zb_out {
    int fd;
    off_t at;
    int count;
    size_t bytes;
    struct iovec iov[64];
};

static int zb_flush(struct zb_out *o)
{
    struct iovec *iov = o->iov;
    int count = o->count;
    while (count > 0) {
        ssize_t done = pwritev(o->fd, iov, count, o->at);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (done == 0)
            return EIO;
        o->at += done;
        while (count > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    o->count = 0;
    o->bytes = 0;
    return 0;
}

/* Queue a piece; write what is queued once a piece's worth (or 64 pieces) is waiting. */
static int zb_queue(struct zb_out *o, const uint8_t *p, size_t len, size_t piece)
{
    if (len == 0)
        return 0;
    o->iov[o->count].iov_base = (void *)p;
    o->iov[o->count].iov_len = len;
    o->count++;
    o->bytes += len;
    if (o->bytes >= piece || o->count == (int)(sizeof o->iov / sizeof o->iov[0]))
        return zb_flush(o);
    return 0;
}

/* The pass both of the next two make: each piece of each part hashed block by block (where
 * a digest target is given), checksummed, and then either queued for writing (o) or copied
 * to dst. */
static int zb_parts(struct zb_out *o, uint8_t *dst, const uint8_t *const *ptrs,
                    const size_t *lens, uint8_t *const *digests, size_t n, size_t block_size,
                    size_t piece, uint8_t out[16])
{
    if (block_size == 0 || piece == 0 || piece % block_size)
        return EINVAL;
    XXH3_state_t state;
    XXH3_INITSTATE(&state);
    XXH3_128bits_reset(&state);
    for (size_t i = 0; i < n; i++) {
        for (size_t at = 0; at < lens[i]; at += piece) {
            size_t len = lens[i] - at < piece ? lens[i] - at : piece;
            const uint8_t *p = ptrs[i] + at;
            if (digests != NULL && digests[i] != NULL)
                zb_hash_blocks(p, len, block_size, digests[i] + at / block_size * ZB_DIGEST_SIZE);
            zb_update(&state, p, len);
            if (dst != NULL) {
                memcpy(dst, p, len);
                dst += len;
            } else {
                int err = zb_queue(o, p, len, piece);
                if (err)
                    return err;
            }
        }
    }
    if (o != NULL) {
        int err = zb_flush(o);
        if (err)
            return err;
    }
    XXH128_canonicalFromHash((XXH128_canonical_t *)(void *)out, XXH3_128bits_digest(&state));
    return 0;
}

int zb_write_parts(int fd, int64_t offset, const uint8_t *const *ptrs, const size_t *lens,
                   uint8_t *const *digests, size_t n, size_t block_size, size_t piece,
                   uint8_t out[16])
{
    struct zb_out o = {.fd = fd, .at = (off_t)offset};
    return zb_parts(&o, NULL, ptrs, lens, digests, n, block_size, piece, out);
}

int zb_stage_parts(uint8_t *dst, const uint8_t *const *ptrs, const size_t *lens,
                   uint8_t *const *digests, size_t n, size_t block_size, size_t piece,
                   uint8_t out[16])
{
    return zb_parts(NULL, dst, ptrs, lens, digests, n, block_size, piece, out);
}
