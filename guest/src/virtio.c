/*
 * virtio 1.x over PCI (modern interface only) with split virtqueues.
 *
 * The CPL0 steps keep at most one request in flight per queue and poll
 * the used ring; blkbench (blk.c, user.c) drives its queue from CPL3.
 * Everything the device hands back (used.idx, used.id, used.len, status)
 * is checked before use, and every wait has a TSC timeout.
 */
#include "pci.h"

#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX 0x11

/* virtio_pci_cap cfg_type */
#define VIRTIO_CAP_COMMON 1
#define VIRTIO_CAP_NOTIFY 2
#define VIRTIO_CAP_ISR 3
#define VIRTIO_CAP_DEVICE 4

/* virtio_pci_common_cfg */
#define VC_DFSELECT 0x00
#define VC_DF 0x04
#define VC_GFSELECT 0x08
#define VC_GF 0x0c
#define VC_MSIX 0x10
#define VC_NUMQ 0x12
#define VC_STATUS 0x14
#define VC_GEN 0x15
#define VC_QSELECT 0x16
#define VC_QSIZE 0x18
#define VC_QMSIX 0x1a
#define VC_QENABLE 0x1c
#define VC_QNOFF 0x1e
#define VC_QDESC 0x20
#define VC_QDRIVER 0x28
#define VC_QDEVICE 0x30
#define VC_LEN 0x38

/* device_status */
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define MSIX_ENABLE 0x8000
#define MSIX_MASKALL 0x4000

#define RING_PAGES 3 /* desc (16 * 256), avail, used: one page each */

static struct vdev *vdev_of[PCI_DEVS_MAX]; /* by PCI list index, allocated on first use */

void res_vdev(struct result *r, const struct vdev *v)
{
    res_str(r, " bdf=");
    res_bdf(r, v->pci);
}

static bool fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    if (v)
        res_vdev(r, v);
    return false;
}

/* The virtio device type of a PCI function, 0 if it is not one. */
static u32 virtio_type(const struct pci_dev *d, bool *transitional)
{
    *transitional = false;
    if (d->vendor != 0x1af4 || d->hdr != 0)
        return 0;
    if (d->device >= 0x1040 && d->device <= 0x107f)
        return d->device - 0x1040u;
    if (d->device >= 0x1000 && d->device <= 0x103f) {
        *transitional = true;
        return d->subsys; /* transitional: the subsystem id is the device type */
    }
    return 0;
}

/* Finds the vendor capabilities; returns false with r filled if some are missing or bad. */
static bool parse_caps(struct vdev *v, struct result *r)
{
    const struct pci_dev *d = v->pci;
    u8 c;
    v->common = v->isr = v->devcfg = v->notify = 0;
    for (c = pci_find_cap(d, PCI_CAP_VENDOR, 0); c; c = pci_find_cap(d, PCI_CAP_VENDOR, c)) {
        u8 type = pci_read8(d, c + 3), bar = pci_read8(d, c + 4), caplen = pci_read8(d, c + 2);
        u32 off = pci_read32(d, c + 8), len = pci_read32(d, c + 12);
        const struct pci_bar *b;
        u64 addr;
        if (type < VIRTIO_CAP_COMMON || type > VIRTIO_CAP_DEVICE || bar > 5 || caplen < 16)
            continue; /* PCI cfg access, shared memory, or malformed: not used */
        b = &d->bar[bar];
        if (!b->size || (b->flags & BAR_IO) || !b->addr || (u64)off + len > b->size || !len)
            continue; /* the spec: use the first capability that is usable */
        addr = b->addr + off;
        if (type == VIRTIO_CAP_COMMON && !v->common && len >= VC_LEN) {
            v->common = addr;
            v->common_len = len;
        } else if (type == VIRTIO_CAP_NOTIFY && !v->notify && caplen >= 20) {
            v->notify = addr;
            v->notify_len = len;
            v->notify_mult = pci_read32(d, c + 16);
        } else if (type == VIRTIO_CAP_ISR && !v->isr) {
            v->isr = addr;
        } else if (type == VIRTIO_CAP_DEVICE && !v->devcfg) {
            v->devcfg = addr;
            v->devcfg_len = len;
        }
    }
    /* "usable": present, in an assigned memory BAR, inside it */
    if (!v->common)
        return fail(r, v, "no usable virtio common cfg capability");
    if (!v->notify)
        return fail(r, v, "no usable virtio notify capability");
    if (!v->isr)
        return fail(r, v, "no usable virtio ISR capability");
    return true;
}

int virtio_find(u32 type, struct vdev **out, u32 max, struct result *r)
{
    struct pci_dev *d;
    u32 n, i, found = 0;

    d = pci_devices(&n, r);
    if (!d)
        return -1;
    for (i = 0; i < n && found < max; i++) {
        bool transitional;
        struct vdev *v;
        struct result tmp;
        if (virtio_type(&d[i], &transitional) != type)
            continue;
        if (!vdev_of[i]) {
            vdev_of[i] = alloc_pages(ALIGN_UP(sizeof(struct vdev), 4096) / 4096);
            if (!vdev_of[i]) {
                res_str(r, "out of memory");
                return -1;
            }
            memset(vdev_of[i], 0, sizeof(struct vdev));
        }
        v = vdev_of[i];
        v->pci = &d[i];
        v->type = type;
        tmp.n = 0;
        if (!parse_caps(v, &tmp)) {
            if (transitional)
                continue; /* legacy-only transitional device: not ours */
            res_strn(r, tmp.buf, tmp.n);
            return -1;
        }
        out[found++] = v;
    }
    return (int)found;
}

static u8 get_status(struct vdev *v) { return rd8(v->common + VC_STATUS); }
static void set_status(struct vdev *v, u8 s) { wr8(v->common + VC_STATUS, s); }

bool virtio_check_status(struct vdev *v, struct result *r)
{
    u8 s = get_status(v);
    if (s & (S_NEEDS_RESET | S_FAILED)) {
        res_str(r, s & S_NEEDS_RESET ? "device needs reset" : "device status FAILED");
        res_str(r, " status=");
        res_hex(r, s);
        res_vdev(r, v);
        return false;
    }
    return true;
}

static bool reset(struct vdev *v)
{
    u64 deadline = rdtsc() + ms_to_tsc(1000);
    set_status(v, 0);
    while (get_status(v) != 0) /* 1.x: reset completes when status reads 0 */
        if (rdtsc() > deadline)
            return false;
    return true;
}

static void wr64_split(u64 addr, u64 v)
{
    wr32(addr, (u32)v);
    wr32(addr + 4, (u32)(v >> 32));
}

static bool setup_msix(struct vdev *v, u16 nvec, u32 irq_base, struct result *r)
{
    const struct pci_dev *d = v->pci;
    u8 c = pci_find_cap(d, PCI_CAP_MSIX, 0);
    u16 ctrl, entries, e;
    u32 tbl, bir, apic;
    u64 off;

    if (!c)
        return fail(r, v, "no MSI-X capability");
    ctrl = pci_read16(d, c + 2);
    entries = (u16)((ctrl & 0x7ff) + 1);
    if (entries < nvec) {
        res_str(r, "MSI-X table has ");
        res_dec(r, entries);
        res_str(r, " entries, ");
        res_dec(r, nvec);
        return fail(r, v, " needed");
    }
    tbl = pci_read32(d, c + 4);
    bir = tbl & 7;
    off = tbl & ~7u;
    if (bir > 5 || !d->bar[bir].size || (d->bar[bir].flags & BAR_IO) || !d->bar[bir].addr ||
        off + (u64)entries * 16 > d->bar[bir].size)
        return fail(r, v, "MSI-X table outside its BAR");
    v->msix_table = d->bar[bir].addr + off;
    if (!map_mmio(v->msix_table, (u64)entries * 16, false))
        return fail(r, v, "cannot map the MSI-X table");
    /* Enable with all vectors masked while the table is written. */
    pci_write16(d, c + 2, ctrl | MSIX_ENABLE | MSIX_MASKALL);
    v->msix_cap = c;
    apic = lapic_id();
    for (e = 0; e < nvec; e++) {
        u64 ent = v->msix_table + 16ULL * e;
        wr32(ent + 0, 0xfee00000u | (apic << 12)); /* fixed, physical destination */
        wr32(ent + 4, 0);
        wr32(ent + 8, irq_base + e); /* edge, fixed delivery */
        wr32(ent + 12, 0);           /* unmasked */
    }
    pci_write16(d, c + 2, (ctrl | MSIX_ENABLE) & ~MSIX_MASKALL);
    wr16(v->common + VC_MSIX, 0);
    if (rd16(v->common + VC_MSIX) == VIRTIO_NO_VECTOR)
        return fail(r, v, "device refused MSI-X config vector 0 (reads 0xffff)");
    return true;
}

static bool setup_queue(struct vdev *v, u16 i, struct result *r)
{
    struct virtq *q = &v->q[i];
    u64 nbase = v->common;
    u16 max, size, noff;
    u64 naddr;

    wr16(nbase + VC_QSELECT, i);
    max = rd16(nbase + VC_QSIZE);
    if (!max) {
        res_str(r, "queue ");
        res_dec(r, i);
        return fail(r, v, " not available");
    }
    size = max < VQ_SIZE_MAX ? max : VQ_SIZE_MAX;
    while (size & (size - 1)) /* split rings: a power of 2 */
        size &= (u16)(size - 1);
    if (!q->mem) {
        q->mem = alloc_pages(RING_PAGES);
        if (!q->mem)
            return fail(r, v, "out of memory for rings");
    }
    memset(q->mem, 0, RING_PAGES * 4096);
    q->index = i;
    q->size = size;
    q->desc = (volatile struct vring_desc *)q->mem;
    q->avail = (volatile struct vring_avail *)(q->mem + 4096);
    q->used = (volatile struct vring_used *)(q->mem + 8192);
    q->avail_idx = q->last_used = q->next_desc = 0;
    q->busy = false;
    q->lax_len = false;
    q->vector = VIRTIO_NO_VECTOR;
    q->avail->flags = v->msix_cap ? 0 : VRING_AVAIL_F_NO_INTERRUPT; /* polled */

    wr16(nbase + VC_QSIZE, size);
    wr64_split(nbase + VC_QDESC, (u64)q->desc);
    wr64_split(nbase + VC_QDRIVER, (u64)q->avail);
    wr64_split(nbase + VC_QDEVICE, (u64)q->used);
    if (v->msix_cap && i >= v->vq_first) {
        wr16(nbase + VC_QMSIX, (u16)(1 + i - v->vq_first));
        q->vector = rd16(nbase + VC_QMSIX);
        if (q->vector == VIRTIO_NO_VECTOR) {
            res_str(r, "device refused MSI-X vector for queue ");
            res_dec(r, i);
            return fail(r, v, " (reads 0xffff)");
        }
    }
    noff = rd16(nbase + VC_QNOFF);
    naddr = (u64)noff * v->notify_mult;
    if (naddr + 2 > v->notify_len) {
        res_str(r, "queue notify offset ");
        res_hex(r, naddr);
        return fail(r, v, " outside the notify region");
    }
    q->notify = v->notify + naddr;
    wr16(nbase + VC_QENABLE, 1);
    return true;
}

bool virtio_init(struct vdev *v, u64 want, struct result *r)
{
    const struct pci_dev *d = v->pci;
    u64 offered;

    v->nq = 0;
    v->msix_cap = 0;
    if (!map_mmio(v->common, v->common_len, false) || !map_mmio(v->isr, 4, false) ||
        !map_mmio(v->notify, v->notify_len, false) ||
        (v->devcfg && !map_mmio(v->devcfg, v->devcfg_len, false)))
        return fail(r, v, "cannot map the virtio BARs");
    pci_write16(d, PCI_COMMAND, pci_read16(d, PCI_COMMAND) | PCI_CMD_MEM | PCI_CMD_MASTER);

    if (!reset(v))
        return fail(r, v, "reset did not complete (status stays non-zero)");
    set_status(v, S_ACKNOWLEDGE);
    set_status(v, S_ACKNOWLEDGE | S_DRIVER);
    wr32(v->common + VC_DFSELECT, 0);
    offered = rd32(v->common + VC_DF);
    wr32(v->common + VC_DFSELECT, 1);
    offered |= (u64)rd32(v->common + VC_DF) << 32;
    if (!(offered & VIRTIO_F_VERSION_1))
        return fail(r, v, "device does not offer VIRTIO_F_VERSION_1");
    v->features = offered & (want | VIRTIO_F_VERSION_1);
    wr32(v->common + VC_GFSELECT, 0);
    wr32(v->common + VC_GF, (u32)v->features);
    wr32(v->common + VC_GFSELECT, 1);
    wr32(v->common + VC_GF, (u32)(v->features >> 32));
    set_status(v, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(get_status(v) & S_FEATURES_OK)) { /* re-read: the device may refuse the subset */
        set_status(v, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
        res_str(r, "device did not keep FEATURES_OK (features ");
        res_hex(r, v->features);
        return fail(r, v, ")");
    }
    v->num_queues = rd16(v->common + VC_NUMQ);
    return true;
}

bool virtio_queues(struct vdev *v, u16 nq, u32 irq_base, u16 vq_first, struct result *r)
{
    u16 i;

    v->irq_base = irq_base;
    v->vq_first = vq_first;
    if (!nq || nq > v->num_queues || nq > VQ_MAX) {
        res_str(r, "device has ");
        res_dec(r, v->num_queues);
        res_str(r, " queues, ");
        res_dec(r, nq);
        fail(r, v, " wanted");
        goto failed;
    }
    if (irq_base && (vq_first >= nq || !setup_msix(v, (u16)(nq - vq_first + 1), irq_base, r)))
        goto failed;
    for (i = 0; i < nq; i++) {
        if (!setup_queue(v, i, r))
            goto failed;
        v->nq = (u16)(i + 1);
    }
    set_status(v, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return virtio_check_status(v, r);
failed:
    set_status(v, get_status(v) | S_FAILED);
    return false;
}

bool virtio_start(struct vdev *v, u64 want, u16 nq, struct result *r)
{
    return virtio_init(v, want, r) && virtio_queues(v, nq, 0, 0, r);
}

void virtio_stop(struct vdev *v)
{
    reset(v); /* also drops the queues and MSI-X vectors on the device side */
    if (v->msix_cap) {
        u16 ctrl = pci_read16(v->pci, v->msix_cap + 2);
        pci_write16(v->pci, v->msix_cap + 2, ctrl & ~MSIX_ENABLE);
        v->msix_cap = 0;
    }
    v->nq = 0;
}

u8 virtio_cfg_gen(struct vdev *v) { return rd8(v->common + VC_GEN); }
u32 virtio_cfg32(struct vdev *v, u32 off) { return rd32(v->devcfg + off); }
u16 virtio_cfg16(struct vdev *v, u32 off) { return rd16(v->devcfg + off); }
u8 virtio_cfg8(struct vdev *v, u32 off) { return rd8(v->devcfg + off); }

bool vq_submit(struct vdev *v, struct virtq *q, const struct vbuf *b, u32 n, struct result *r)
{
    u16 mask = (u16)(q->size - 1), head = q->next_desc;
    u32 k;
    u32 wlen = 0, tlen = 0;

    if (q->busy || !n || n > q->size)
        return fail(r, v, "driver bug: queue busy or chain too long");
    for (k = 0; k < n; k++) {
        volatile struct vring_desc *dd = &q->desc[(head + k) & mask];
        dd->addr = b[k].addr;
        dd->len = b[k].len;
        dd->flags = (u16)((b[k].write ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
        dd->next = (u16)((head + k + 1) & mask);
        if (b[k].write)
            wlen += b[k].len;
        tlen += b[k].len;
    }
    q->next_desc = (u16)((head + n) & mask); /* rotate, so the device sees varied heads */
    q->head = head;
    q->wlen = wlen;
    q->tlen = tlen;
    q->busy = true;
    q->avail->ring[q->avail_idx & mask] = head;
    q->avail_idx++;
    barrier(); /* x86 keeps stores in order; the compiler must too */
    q->avail->idx = q->avail_idx;
    mfence();
    wr16(q->notify, q->index);
    return true;
}

int vq_poll(struct vdev *v, struct virtq *q, u32 *len, struct result *r)
{
    u16 idx = q->used->idx, id_ok;
    u32 id, l;

    if (idx == q->last_used)
        return 0;
    if (!q->busy || (u16)(idx - q->last_used) != 1) {
        res_str(r, "used idx moved from ");
        res_dec(r, q->last_used);
        res_str(r, " to ");
        res_dec(r, idx);
        res_str(r, " with ");
        res_dec(r, q->busy ? 1 : 0);
        res_str(r, " request in flight on queue ");
        res_dec(r, q->index);
        fail(r, v, "");
        return -1;
    }
    barrier(); /* the element is read after the index (x86 keeps loads in order) */
    id = q->used->ring[q->last_used & (q->size - 1)].id;
    l = q->used->ring[q->last_used & (q->size - 1)].len;
    q->last_used++;
    q->busy = false;
    id_ok = id == q->head;
    if (!id_ok || l > (q->lax_len ? q->tlen : q->wlen)) {
        res_str(r, id_ok ? "used len " : "used id ");
        res_dec(r, id_ok ? l : id);
        res_str(r, id_ok ? " exceeds the writable " : " is not the head in flight ");
        res_dec(r, id_ok ? q->wlen : q->head);
        res_str(r, " on queue ");
        res_dec(r, q->index);
        fail(r, v, "");
        return -1;
    }
    *len = l;
    return 1;
}

bool vq_wait(struct vdev *v, struct virtq *q, u32 *len, u64 timeout_ms, struct result *r)
{
    u64 deadline = rdtsc() + ms_to_tsc(timeout_ms);
    for (;;) {
        int k = vq_poll(v, q, len, r);
        if (k < 0)
            return false;
        if (k > 0)
            return virtio_check_status(v, r);
        if (rdtsc() > deadline)
            break;
        cpu_relax();
    }
    if (!virtio_check_status(v, r))
        return false;
    res_str(r, "timeout waiting for queue ");
    res_dec(r, q->index);
    res_str(r, " after ");
    res_dec(r, timeout_ms);
    res_str(r, " ms");
    res_vdev(r, v);
    return false;
}

void vq_post_writable(struct virtq *q, u16 id, u64 addr, u32 len)
{
    u16 mask = (u16)(q->size - 1);
    q->desc[id].addr = addr;
    q->desc[id].len = len;
    q->desc[id].flags = VRING_DESC_F_WRITE;
    q->desc[id].next = 0;
    q->avail->ring[q->avail_idx & mask] = id;
    q->avail_idx++;
    barrier();
    q->avail->idx = q->avail_idx;
}

void vq_notify(struct virtq *q)
{
    mfence();
    wr16(q->notify, q->index);
}
