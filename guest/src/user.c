/*
 * Code that runs at CPL3 through run_user(): on kvm_pvm CPL3 runs natively
 * while every CPL0 instruction is emulated, so all loops over memory or
 * bytes live here. These functions must not do port I/O (it faults at
 * CPL3) and only touch user-accessible (U/S) pages.
 */
#include "pci.h"

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

/* Checks the inverse pattern user_memtest left: memory that must have kept
 * it (across a snapshot or migration of the VM, say). */
u64 user_memcheck(void *arg)
{
    struct memtest_job *j = arg;
    j->checked_bytes = 0;
    j->failed = 0;
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

/* ---- numa: the PCI host bridges' _PXM in the DSDT ---- */

/* An AML PkgLength at p: its value (which counts its own bytes) and size. */
static u32 aml_pkg_length(const volatile u8 *p, u32 *size)
{
    u32 lead = p[0], extra = lead >> 6, v, i;
    if (!extra) {
        *size = 1;
        return lead & 0x3f;
    }
    v = lead & 0x0f;
    for (i = 0; i < extra; i++)
        v |= (u32)p[1 + i] << (4 + 8 * i);
    *size = extra + 1;
    return v;
}

/* An AML integer constant at p (ZeroOp, OneOp, OnesOp or a prefixed value). */
static bool aml_const(const volatile u8 *p, u32 avail, u64 *v)
{
    u32 n = 0, i;
    if (!avail)
        return false;
    switch (p[0]) {
    case 0x00:
        *v = 0;
        return true;
    case 0x01:
        *v = 1;
        return true;
    case 0xff:
        *v = ~0ULL;
        return true;
    case 0x0a:
        n = 1;
        break;
    case 0x0b:
        n = 2;
        break;
    case 0x0c:
        n = 4;
        break;
    case 0x0e:
        n = 8;
        break;
    default:
        return false;
    }
    if (avail < 1 + n)
        return false;
    *v = 0;
    for (i = 0; i < n; i++)
        *v |= (u64)p[1 + i] << (8 * i);
    return true;
}

static bool name_char(u8 c) { return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'; }

/*
 * Every DeviceOp (5B 82) whose name's last segment is PCxx, and the first
 * _PXM inside it: Name(_PXM, const) or Method(_PXM) { Return(const) }.
 */
u64 user_find_pxm(void *arg)
{
    struct pxm_job *j = arg;
    const volatile u8 *p = (const volatile u8 *)j->addr;
    u32 i, len = j->len;

    j->n = 0;
    j->overflow = 0;
    for (i = 0; i + 8 <= len; i++) {
        u32 k, end, size, seg, m;
        if (p[i] != 0x5b || p[i + 1] != 0x82)
            continue;
        k = i + 2;
        end = k + aml_pkg_length(p + k, &size);
        if (end > len)
            continue;
        k += size;
        while (k < end && (p[k] == '\\' || p[k] == '^'))
            k++;
        if (k + 1 < end && p[k] == 0x2e) { /* DualNamePrefix: the second segment */
            seg = k + 5;
            k += 9;
        } else if (k + 2 < end && p[k] == 0x2f && p[k + 1]) { /* MultiNamePrefix */
            seg = k + 2 + 4 * (p[k + 1] - 1u);
            k += 2 + 4 * p[k + 1];
        } else {
            seg = k;
            k += 4;
        }
        if (k > end || p[seg] != 'P' || p[seg + 1] != 'C' || !name_char(p[seg + 2]) ||
            !name_char(p[seg + 3]))
            continue;
        if (j->n == PXM_MAX) {
            j->overflow = 1;
            break;
        }
        j->dev[j->n].name[0] = 'P';
        j->dev[j->n].name[1] = 'C';
        j->dev[j->n].name[2] = (char)p[seg + 2];
        j->dev[j->n].name[3] = (char)p[seg + 3];
        j->dev[j->n].kind = 0;
        for (m = k; m + 4 <= end; m++) {
            u64 v;
            if (p[m] != '_' || p[m + 1] != 'P' || p[m + 2] != 'X' || p[m + 3] != 'M')
                continue;
            j->dev[j->n].kind = 2;
            /* MethodOp, a PkgLength of 1 or 2 bytes, the name, flags, ReturnOp (its
             * PkgLength may itself be 0x08, so this is told apart from NameOp first) */
            if (((p[m - 2] == 0x14 && !(p[m - 1] >> 6)) || (p[m - 3] == 0x14 && p[m - 2] >> 6 == 1))) {
                if (m + 6 <= end && p[m + 5] == 0xa4 && aml_const(p + m + 6, end - m - 6, &v)) {
                    j->dev[j->n].kind = 1;
                    j->dev[j->n].value = v;
                }
            } else if (p[m - 1] == 0x08 && aml_const(p + m + 4, end - m - 4, &v)) { /* NameOp */
                j->dev[j->n].kind = 1;
                j->dev[j->n].value = v;
            }
            break;
        }
        j->n++;
    }
    return 0;
}

/* ---- blk: FNV-1a, the sector pattern, buffer compare ---- */

static inline u64 blk_pattern(u64 sector, u64 j) { return BLK_PATTERN ^ (sector << 16) ^ j; }

u64 user_buf(void *arg)
{
    struct buf_job *j = arg;
    volatile u64 *p = (volatile u64 *)j->addr, *p2 = (volatile u64 *)j->addr2;
    u64 i, n = j->len / 8;

    j->bad = 0;
    switch (j->op) {
    case BUF_FNV: {
        const volatile u8 *b = (const volatile u8 *)j->addr;
        u64 h = 0xcbf29ce484222325ULL;
        for (i = 0; i < j->len; i++)
            h = (h ^ b[i]) * 0x100000001b3ULL;
        j->hash = h;
        break;
    }
    case BUF_ZERO:
        for (i = 0; i < n; i++)
            p[i] = 0;
        break;
    case BUF_NOT:
        for (i = 0; i < n; i++)
            p[i] = ~p2[i];
        break;
    case BUF_FILL:
        for (i = 0; i < n; i++)
            p[i] = blk_pattern(j->sector + i / 64, i % 64);
        break;
    case BUF_CHECK:
    case BUF_CMP:
    case BUF_ISZERO:
        for (i = 0; i < n; i++) {
            u64 want = j->op == BUF_CHECK ? blk_pattern(j->sector + i / 64, i % 64)
                       : j->op == BUF_CMP ? p2[i]
                                          : 0;
            u64 got = p[i];
            if (got != want) {
                j->bad = 1;
                j->bad_off = i * 8;
                j->expected = want;
                j->found = got;
                break;
            }
        }
        break;
    }
    return 0;
}

/* ---- blkbench: a polling virtio-blk driver, entirely at CPL3 ---- */

struct blk_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

static inline void desc_set(volatile struct vring_desc *d, u64 addr, u32 len, u16 flags, u16 next)
{
    d->addr = addr;
    d->len = len;
    d->flags = flags;
    d->next = next;
}

struct bench_state {
    u64 issued, next_off, rnd, cap_bytes, nblocks;
    u32 pending, inflight;
    u16 mask;
    bool rd;
};

/* Puts slot's request (next offset for the mode) on the avail ring, not yet published. */
static void bench_submit(struct bench_job *j, struct bench_state *b, u32 slot)
{
    volatile struct blk_hdr *h = (volatile struct blk_hdr *)(j->hdrs + 16ULL * slot);
    u64 off;
    if (j->mode == BENCH_RANDREAD) {
        b->rnd ^= b->rnd << 13; /* xorshift64 */
        b->rnd ^= b->rnd >> 7;
        b->rnd ^= b->rnd << 17;
        off = (b->rnd % b->nblocks) * 4096;
    } else {
        if (b->next_off + j->size > b->cap_bytes)
            b->next_off = 0; /* wrap around the disk */
        off = b->next_off;
        b->next_off += j->size;
    }
    h->type = b->rd ? 0 : 1; /* VIRTIO_BLK_T_IN / _OUT */
    h->sector = off / 512;
    ((volatile u8 *)j->status)[4 * slot] = 0xff;
    j->inflight[slot] = 1;
    j->avail->ring[j->avail_idx & b->mask] = (u16)(j->indirect ? slot : 3 * slot);
    j->avail_idx++;
    b->issued++;
    b->pending++;
    b->inflight++;
}

/* Takes one used element: returns false (j->err set) if the device got it wrong. */
static bool bench_complete(struct bench_job *j, struct bench_state *b)
{
    volatile struct vring_used_elem *e = &j->used->ring[j->last_used & b->mask];
    u32 id = e->id, len = e->len, slot = j->indirect ? id : id / 3;
    u32 wmax = b->rd || j->lax_len ? (u32)j->size + 1 : 1;
    u8 st;

    j->last_used++;
    if ((!j->indirect && id % 3) || slot >= j->depth || !j->inflight[slot]) {
        j->err = BENCH_BAD_ID;
        j->err_a = id;
        return false;
    }
    if (len > wmax) {
        j->err = BENCH_BAD_LEN;
        j->err_a = len;
        j->err_b = wmax;
        return false;
    }
    st = ((volatile u8 *)j->status)[4 * slot];
    if (st != 0) {
        j->err = BENCH_BAD_STATUS;
        j->err_a = st;
        j->err_b = ((volatile struct blk_hdr *)(j->hdrs + 16ULL * slot))->sector;
        return false;
    }
    j->inflight[slot] = 0;
    b->inflight--;
    j->done++;
    if (b->issued < j->count)
        bench_submit(j, b, slot); /* keep depth requests in flight */
    return true;
}

u64 user_blkbench(void *arg)
{
    struct bench_job *j = arg;
    struct bench_state b;
    u64 t0, last;
    u32 s;

    b.issued = b.next_off = 0;
    b.rnd = 0x9e3779b97f4a7c15ULL;
    b.cap_bytes = j->cap_sectors * 512;
    b.nblocks = (b.cap_bytes - j->size) / 4096 + 1;
    b.pending = b.inflight = 0;
    b.mask = (u16)(j->qsize - 1);
    b.rd = j->mode != BENCH_WRITE;

    /* The descriptors never change; a request only rewrites its header. */
    for (s = 0; s < j->depth; s++) {
        u64 hdr = j->hdrs + 16ULL * s, data = j->data + j->size * s, st = j->status + 4ULL * s;
        u16 dflags = b.rd ? VRING_DESC_F_WRITE : 0;
        if (j->indirect) {
            volatile struct vring_desc *t = (volatile struct vring_desc *)(j->tables + 48ULL * s);
            desc_set(&t[0], hdr, 16, VRING_DESC_F_NEXT, 1);
            desc_set(&t[1], data, (u32)j->size, dflags | VRING_DESC_F_NEXT, 2);
            desc_set(&t[2], st, 1, VRING_DESC_F_WRITE, 0);
            desc_set(&j->desc[s], (u64)t, 48, VRING_DESC_F_INDIRECT, 0);
        } else {
            u16 d = (u16)(3 * s);
            desc_set(&j->desc[d], hdr, 16, VRING_DESC_F_NEXT, (u16)(d + 1));
            desc_set(&j->desc[d + 1], data, (u32)j->size, dflags | VRING_DESC_F_NEXT, (u16)(d + 2));
            desc_set(&j->desc[d + 2], st, 1, VRING_DESC_F_WRITE, 0);
        }
        j->inflight[s] = 0;
        if (!b.rd) {
            /* Real data: never-touched guest pages would let the VMM copy
             * from the host's zero page, which flatters the write figures. */
            volatile u64 *p = (volatile u64 *)data;
            u64 i;
            for (i = 0; i < j->size / 8; i++)
                p[i] = blk_pattern(s, i);
        }
    }

    j->done = 0;
    j->err = BENCH_OK;
    t0 = rdtsc();
    for (s = 0; s < j->depth && b.issued < j->count; s++)
        bench_submit(j, &b, s);
    last = t0;
    while (j->done < j->count) {
        u16 idx;
        if (b.pending) { /* publish, then notify unless the device says it is polling */
            barrier();
            j->avail->idx = j->avail_idx;
            mfence();
            if (!(j->used->flags & VRING_USED_F_NO_NOTIFY))
                *(volatile u16 *)j->notify = j->qindex;
            b.pending = 0;
        }
        idx = j->used->idx;
        if (idx == j->last_used) {
            if (rdtsc() - last > j->timeout) {
                j->err = BENCH_TIMEOUT;
                break;
            }
            continue;
        }
        if ((u16)(idx - j->last_used) > b.inflight) {
            j->err = BENCH_BAD_IDX;
            j->err_a = j->last_used;
            j->err_b = idx;
            break;
        }
        barrier(); /* elements after the index */
        while (j->last_used != idx)
            if (!bench_complete(j, &b))
                break;
        if (j->err)
            break;
        last = rdtsc();
    }
    j->tsc = rdtsc() - t0;
    return j->err;
}

/* ---- dirty: rewrite a region every round, checking the last round's values ---- */

static inline u64 dirty_value(u64 a, u64 round) { return a ^ (round * 0x9e3779b97f4a7c15ULL); }

u64 user_dirty(void *arg)
{
    struct dirty_job *j = arg;
    u64 a;
    for (a = j->start; a < j->end; a += 8) {
        volatile u64 *p = (volatile u64 *)a;
        if (j->round) {
            u64 want = dirty_value(a, j->round - 1), got = *p;
            if (got != want) {
                j->fail_addr = a;
                j->fail_expected = want;
                j->fail_found = got;
                return 1;
            }
        }
        *p = dirty_value(a, j->round);
    }
    return 0;
}

/* ---- vsock: one connection's data at CPL3, the rings and notify registers mapped ---- */

struct vs_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

#define VS_OP_RW 5
#define VS_OP_CREDIT_UPDATE 6
#define VS_OP_CREDIT_REQUEST 7
#define VS_HDR 44

static void vj_publish(struct vsock_ring *q)
{
    barrier();
    q->avail->idx = q->avail_idx;
    mfence();
    if (!(q->used->flags & VRING_USED_F_NO_NOTIFY))
        *(volatile u16 *)q->notify = q->qindex;
}

/* Takes the tx slots the device is done with; *free counts the free ones. */
static bool vj_reap_tx(struct vsock_job *j, u32 *free)
{
    u16 idx = j->tx.used->idx;
    if ((u16)(idx - j->tx.last_used) > j->ntx - *free) {
        j->err = VJ_BAD_USED;
        return false;
    }
    *free += (u16)(idx - j->tx.last_used);
    j->tx.last_used = idx;
    return true;
}

/* One packet in the next tx slot (slots are used in order, so the free one
 * is avail_idx's); waits for a free slot. `copy`: payload, or NULL. */
static bool vj_send(struct vsock_job *j, u32 *free, u16 op, const volatile u8 *copy, u32 len)
{
    u64 waited = rdtsc();
    u16 slot;
    volatile struct vs_hdr *h;
    u32 i;
    while (!*free) {
        if (!vj_reap_tx(j, free))
            return false;
        if (rdtsc() - waited > j->timeout) {
            j->err = VJ_TIMEOUT;
            return false;
        }
    }
    slot = (u16)(j->tx.avail_idx % j->ntx);
    h = (volatile struct vs_hdr *)(j->tx_mem + 4096ULL * slot);
    h->src_cid = j->cid;
    h->dst_cid = 2;
    h->src_port = j->local;
    h->dst_port = j->peer;
    h->len = len;
    h->type = 1;
    h->op = op;
    h->flags = 0;
    h->buf_alloc = j->buf_alloc;
    h->fwd_cnt = (u32)j->got;
    for (i = 0; copy && i < len; i++)
        ((volatile u8 *)h)[VS_HDR + i] = copy[i];
    j->tx.desc[slot].len = VS_HDR + len;
    j->tx.avail->ring[j->tx.avail_idx & (j->tx.size - 1)] = slot;
    j->tx.avail_idx++;
    (*free)--;
    if (op != VS_OP_RW)
        j->reported = j->got;
    vj_publish(&j->tx);
    return true;
}

u64 user_vsock(void *arg)
{
    struct vsock_job *j = arg;
    u32 free = j->ntx, i;
    u64 last = rdtsc();

    j->err = VJ_OK;
    for (i = 0; i < j->ntx; i++) {
        j->tx.desc[i].addr = j->tx_mem + 4096ULL * i;
        j->tx.desc[i].flags = 0;
        j->tx.desc[i].next = 0;
    }
    for (;;) {
        u16 idx = j->rx.used->idx;
        bool posted = false;
        if ((u16)(idx - j->rx.last_used) > j->nrx) {
            j->err = VJ_BAD_USED;
            break;
        }
        while (j->rx.last_used != idx) {
            volatile struct vring_used_elem *e = &j->rx.used->ring[j->rx.last_used & (j->rx.size - 1)];
            u32 id = e->id, len = e->len;
            volatile struct vs_hdr *h = (volatile struct vs_hdr *)(j->rx_mem + 4096ULL * (id % j->nrx));
            bool ours = id < j->nrx && len >= VS_HDR && h->len <= len - VS_HDR &&
                        h->src_port == j->peer && h->dst_port == j->local;
            if (!ours || (h->op != VS_OP_RW && h->op != VS_OP_CREDIT_UPDATE &&
                          h->op != VS_OP_CREDIT_REQUEST)) {
                j->stop_op = ours ? h->op : 0;
                j->err = VJ_STOPPED; /* CPL0 takes it from here */
                goto out;
            }
            j->peer_buf_alloc = h->buf_alloc;
            j->peer_fwd_cnt = h->fwd_cnt;
            if (h->op == VS_OP_RW) {
                if (j->mode == VJ_ECHO &&
                    !vj_send(j, &free, VS_OP_RW, (const volatile u8 *)h + VS_HDR, h->len))
                    goto out;
                j->got += h->len;
                if (j->mode == VJ_ECHO)
                    j->sent += h->len;
            } else if (h->op == VS_OP_CREDIT_REQUEST &&
                       !vj_send(j, &free, VS_OP_CREDIT_UPDATE, 0, 0)) {
                goto out;
            }
            j->rx.last_used++;
            /* The buffer goes back at once, under its own descriptor. */
            j->rx.avail->ring[j->rx.avail_idx & (j->rx.size - 1)] = (u16)id;
            j->rx.avail_idx++;
            posted = true;
            last = rdtsc();
        }
        if (posted)
            vj_publish(&j->rx);
        if (j->mode == VJ_SINK && j->got - j->reported >= j->buf_alloc / 4 &&
            !vj_send(j, &free, VS_OP_CREDIT_UPDATE, 0, 0))
            break;
        if (j->mode == VJ_SOURCE) {
            u32 in_flight = (u32)j->sent - j->peer_fwd_cnt;
            u32 credit = in_flight >= j->peer_buf_alloc ? 0 : j->peer_buf_alloc - in_flight;
            u32 len = 4096 - VS_HDR;
            if (!vj_reap_tx(j, &free))
                break;
            if (len > j->bytes - j->sent)
                len = (u32)(j->bytes - j->sent);
            if (len > credit)
                len = credit;
            if (len && free) {
                if (!vj_send(j, &free, VS_OP_RW, 0, len))
                    break;
                j->sent += len;
                last = rdtsc();
            }
        }
        if ((j->mode == VJ_SOURCE && j->sent == j->bytes) ||
            (j->mode != VJ_SOURCE && j->got >= j->bytes))
            break;
        if (rdtsc() - last > j->timeout) {
            j->err = VJ_TIMEOUT;
            break;
        }
    }
out:
    /* Every slot back before CPL0 takes the queue over. */
    last = rdtsc();
    while (free < j->ntx && j->err != VJ_BAD_USED) {
        if (!vj_reap_tx(j, &free))
            break;
        if (rdtsc() - last > j->timeout) {
            j->err = VJ_TIMEOUT;
            break;
        }
    }
    return j->err;
}

/* ---- tpm: one command through the CRB (TCG PC Client PTP), the DSDT's device ---- */

#define CRB_CTRL_STS 0x44
#define CRB_CTRL_START 0x4c

static inline u32 le32_at(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }

/* Copies the command in (whole dwords, then single bytes: both access sizes),
 * sets CRB_CTRL_START and polls it until the TPM clears it, then copies the
 * response out, as long as its header's size says (at most rsp_cap). */
u64 user_tpm_exchange(void *arg)
{
    struct tpm_job *j = arg;
    volatile u32 *start = (volatile u32 *)(j->crb + CRB_CTRL_START);
    u64 buf = j->buf_addr, t0;
    u8 head[10];
    u32 i, n, len;

    j->err = TPMX_OK;
    j->rsp_len = 0;
    for (i = 0; i + 4 <= j->cmd_len; i += 4)
        *(volatile u32 *)(buf + i) = le32_at(j->cmd + i);
    for (; i < j->cmd_len; i++)
        *(volatile u8 *)(buf + i) = j->cmd[i];
    t0 = rdtsc();
    *start = 1;
    while (*start & 1) {
        if (rdtsc() - t0 > j->timeout) {
            j->err = TPMX_TIMEOUT;
            break;
        }
        __asm__ volatile("pause");
    }
    j->tsc = rdtsc() - t0;
    j->ctrl_start = *start;
    j->ctrl_sts = *(volatile u32 *)(j->crb + CRB_CTRL_STS);
    if (j->err)
        return j->err;
    for (i = 0; i < 8; i += 4) {
        u32 v = *(volatile u32 *)(buf + i);
        head[i] = (u8)v;
        head[i + 1] = (u8)(v >> 8);
        head[i + 2] = (u8)(v >> 16);
        head[i + 3] = (u8)(v >> 24);
    }
    head[8] = *(volatile u8 *)(buf + 8);
    head[9] = *(volatile u8 *)(buf + 9);
    len = (u32)head[2] << 24 | (u32)head[3] << 16 | (u32)head[4] << 8 | head[5];
    j->rsp_len = len;
    if (len < 10 || len > j->buf_size) {
        j->err = TPMX_BAD_SIZE;
        return j->err;
    }
    n = len < j->rsp_cap ? len : j->rsp_cap;
    for (i = 0; i < n && i < 10; i++)
        j->rsp[i] = head[i];
    for (; i < n; i++)
        j->rsp[i] = *(volatile u8 *)(buf + i);
    return j->err;
}

/* The DSDT's TPM 2.0 device: "MSFT0101", then the Memory32Fixed descriptor
 * (0x86, length 9) of its _CRS within the next 128 bytes. */
u64 user_find_tpm_hid(void *arg)
{
    struct hid_job *j = arg;
    const volatile u8 *p = (const volatile u8 *)j->addr;
    static const char hid[] = "MSFT0101";
    u32 i, k;
    j->found = j->crs_found = 0;
    for (i = 0; i + 8 <= j->len; i++) {
        for (k = 0; k < 8 && p[i + k] == (u8)hid[k]; k++)
            ;
        if (k == 8)
            break;
    }
    if (i + 8 > j->len)
        return 0;
    j->found = 1;
    for (k = i + 8; k + 12 <= j->len && k < i + 8 + 128; k++) {
        if (p[k] == 0x86 && p[k + 1] == 0x09 && p[k + 2] == 0x00) {
            j->crs_found = 1;
            j->crs_base = p[k + 4] | p[k + 5] << 8 | p[k + 6] << 16 | (u32)p[k + 7] << 24;
            j->crs_len = p[k + 8] | p[k + 9] << 8 | p[k + 10] << 16 | (u32)p[k + 11] << 24;
            break;
        }
    }
    return 0;
}

/* An AML integer at p[0..len): ZeroOp, OneOp, OnesOp or a Byte/Word/DWord/QWord prefix. */
static bool aml_integer(const volatile u8 *p, u32 len, u64 *value)
{
    u32 size, i;
    if (!len)
        return false;
    switch (p[0]) {
    case 0x00: *value = 0; return true;
    case 0x01: *value = 1; return true;
    case 0xff: *value = ~0ULL; return true;
    case 0x0a: size = 1; break;
    case 0x0b: size = 2; break;
    case 0x0c: size = 4; break;
    case 0x0e: size = 8; break;
    default: return false;
    }
    if (len < 1 + size)
        return false;
    *value = 0;
    for (i = 0; i < size; i++)
        *value |= (u64)p[1 + i] << (8 * i);
    return true;
}

static bool bytes_at(const volatile u8 *p, const char *s, u32 n)
{
    u32 k;
    for (k = 0; k < n && p[k] == (u8)s[k]; k++)
        ;
    return k == n;
}

/* The hot-plug registers in the DSDT: each SystemMemory OperationRegion
 * (5B 80 NameSeg 00 Offset) the AML reads them through, and the first
 * Extended Interrupt descriptor (0x89) after the GED's "ACPI0013" _HID. */
u64 user_find_hotplug_regs(void *arg)
{
    struct hotplug_regs *j = arg;
    const volatile u8 *p = (const volatile u8 *)j->addr;
    static const char hid[] = "\x0d" "ACPI0013"; /* a String, with its NUL */
    static const struct { const char *name; u32 bit; } regions[] = {
        {"GDST", HP_GED}, {"PRST", HP_CPU}, {"MHPR", HP_MEMORY}, {"PCST", HP_PCI},
    };
    u64 *where[] = {&j->ged, &j->cpu, &j->memory, &j->pci};
    u32 i, k, q;
    for (i = 36; i + 7 <= j->len; i++) {
        if (p[i] == 0x5b && p[i + 1] == 0x80 && p[i + 6] == 0x00) {
            for (k = 0; k < ARRAY_SIZE(regions); k++)
                if (!(j->found & regions[k].bit) && bytes_at(p + i + 2, regions[k].name, 4) &&
                    aml_integer(p + i + 7, j->len - i - 7, where[k]))
                    j->found |= regions[k].bit;
        } else if (!(j->found & HP_GED_GSI) && i + sizeof(hid) <= j->len &&
                   bytes_at(p + i, hid, sizeof(hid))) {
            for (q = i + sizeof(hid); q + 9 <= j->len && q < i + sizeof(hid) + 256; q++)
                if (p[q] == 0x89 && (p[q + 1] | p[q + 2] << 8) >= 6 && p[q + 4] >= 1) {
                    j->ged_gsi = p[q + 5] | p[q + 6] << 8 | p[q + 7] << 16 | (u32)p[q + 8] << 24;
                    j->found |= HP_GED_GSI;
                    break;
                }
        }
    }
    return 0;
}
