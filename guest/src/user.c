/*
 * Code that runs at CPL3 through run_user(): on kvm_pvm CPL3 runs natively
 * while every CPL0 instruction is emulated, so all loops over memory or
 * bytes live here. These functions must not do port I/O (it faults at
 * CPL3) and only touch user-accessible (U/S) pages.
 */
#include "guest.h"

/* ---- memmap: pattern test ---- */

#define EDGE (64 * KiB) /* tested fully at both ends of each segment */

static inline u64 pattern(u64 a) { return a ^ 0xa5a5a5a55a5a5a5aULL; } /* unique per address */

enum { WRITE_PAT, CHECK_PAT_WRITE_INV, CHECK_INV };

/* One qword: returns false (and records it) on a mismatch. */
static inline bool visit(struct memtest_job *j, u64 a, int pass)
{
    volatile u64 *p = (volatile u64 *)a;
    u64 want, got;
    switch (pass) {
    case WRITE_PAT:
        *p = pattern(a);
        j->checked_bytes += 8;
        return true;
    case CHECK_PAT_WRITE_INV:
        want = pattern(a);
        got = *p;
        if (got != want)
            break;
        *p = ~want;
        return true;
    default:
        want = ~pattern(a);
        got = *p;
        if (got != want)
            break;
        return true;
    }
    j->failed = 1;
    j->fail_addr = a;
    j->fail_expected = want;
    j->fail_found = got;
    return false;
}

static bool visit_block(struct memtest_job *j, u64 s, u64 e, int pass)
{
    for (; s < e; s += 8)
        if (!visit(j, s, pass))
            return false;
    return true;
}

static bool memtest_pass(struct memtest_job *j, int pass)
{
    u32 i;
    for (i = 0; i < j->nseg; i++) {
        u64 s = ALIGN_UP(j->segs[i].start, 8), e = ALIGN_DOWN(j->segs[i].end, 8), a;
        if (e <= s)
            continue;
        if (e - s <= 2 * EDGE) {
            if (!visit_block(j, s, e, pass))
                return false;
            continue;
        }
        if (!visit_block(j, s, s + EDGE, pass))
            return false;
        for (a = s + EDGE; a < e - EDGE; a += j->stride) /* 64 KiB unless memmap_stride= */
            if (!visit(j, a, pass))
                return false;
        if (!visit_block(j, e - EDGE, e, pass))
            return false;
    }
    return true;
}

/*
 * Three passes over all segments: write the address pattern everywhere,
 * then check it and write the inverse, then check the inverse. Writing
 * everything before reading anything back catches aliased memory.
 */
u64 user_memtest(void *arg)
{
    struct memtest_job *j = arg;
    j->checked_bytes = 0;
    j->failed = 0;
    if (memtest_pass(j, WRITE_PAT) && memtest_pass(j, CHECK_PAT_WRITE_INV))
        memtest_pass(j, CHECK_INV);
    return j->failed;
}

/* ---- cpl3: a timed native loop ---- */

u64 user_spin(void *arg)
{
    struct cpl3_job *j = arg;
    u64 n = j->iterations, t0, t1;
    t0 = rdtsc();
    if (n)
        __asm__ volatile("1: dec %0\n\tjnz 1b" : "+r"(n));
    t1 = rdtsc();
    j->tsc = t1 - t0;
    return 0;
}

/* ---- acpi: byte sums of tables ---- */

u64 user_checksum(void *arg)
{
    struct csum_job *j = arg;
    u32 i, k;
    for (i = 0; i < j->n; i++) {
        const volatile u8 *p = (const volatile u8 *)j->t[i].addr;
        u8 s = 0;
        for (k = 0; k < j->t[i].len; k++)
            s = (u8)(s + p[k]);
        j->t[i].sum = s;
    }
    return 0;
}

/* ---- acpi: RSDP scan on 16-byte boundaries ---- */

u64 user_find_rsdp(void *arg)
{
    struct scan_job *j = arg;
    u64 a;
    j->found = 0;
    for (a = j->start; a + 16 <= j->end; a += 16)
        if (*(const volatile u64 *)a == 0x2052545020445352ULL) { /* "RSD PTR " */
            j->found = a;
            break;
        }
    return 0;
}

/* ---- poweroff: SLP_TYP from the DSDT's \_S5_ package ---- */

u64 user_find_s5(void *arg)
{
    struct s5_job *j = arg;
    const volatile u8 *p = (const volatile u8 *)j->addr;
    u32 i;
    j->found = 0;
    for (i = 0; i + 8 <= j->len; i++) {
        u32 k;
        if (p[i] != '_' || p[i + 1] != 'S' || p[i + 2] != '5' || p[i + 3] != '_' || p[i + 4] != 0x12)
            continue;
        k = i + 5;
        k += 1 + (p[k] >> 6); /* PkgLength: lead byte bits 7:6 = extra bytes */
        k += 1;               /* NumElements */
        if (k + 1 >= j->len)
            break;
        if (p[k] == 0x0a) { /* BytePrefix */
            j->slp_typ = p[k + 1];
            j->found = 1;
        } else if (p[k] == 0x00 || p[k] == 0x01) { /* ZeroOp, OneOp */
            j->slp_typ = p[k];
            j->found = 1;
        }
        break;
    }
    return 0;
}
