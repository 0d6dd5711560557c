/*
 * PCI (pci.c) and virtio-pci modern (virtio.c) declarations, shared by the
 * device steps (vsteps.c, blk.c) and their CPL3 helpers (user.c).
 */
#ifndef VMKIT_PCI_H
#define VMKIT_PCI_H

#include "guest.h"

/* ---- pci.c ---- */
#define PCI_DEVS_MAX 64
#define PCI_SEGS_MAX 8

#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_CMD_IO 0x0001
#define PCI_CMD_MEM 0x0002
#define PCI_CMD_MASTER 0x0004
#define PCI_STATUS_CAPS 0x0010

#define BAR_64 1
#define BAR_PREF 2
#define BAR_IO 4

struct pci_bar {
    u64 addr;
    u64 size; /* 0: not implemented (or the upper half of a 64-bit BAR) */
    u32 flags; /* BAR_64 | BAR_PREF | BAR_IO */
};

struct pci_dev {
    u64 ecam; /* config space through ECAM; 0: through ports 0xcf8/0xcfc */
    u16 seg;
    u8 bus, dev, fn;
    u8 hdr; /* header type, multi-function bit masked */
    u16 vendor, device, subsys;
    u32 class; /* base << 16 | sub << 8 | prog-if */
    struct pci_bar bar[6];
};

u8 pci_read8(const struct pci_dev *d, u32 reg);
u16 pci_read16(const struct pci_dev *d, u32 reg);
u32 pci_read32(const struct pci_dev *d, u32 reg);
void pci_write16(const struct pci_dev *d, u32 reg, u16 v);
void pci_write32(const struct pci_dev *d, u32 reg, u32 v);
/* Enumerates once; later calls return the same list. NULL (and r filled) on failure. */
struct pci_dev *pci_devices(u32 *n, struct result *r);
/* Offset of the next capability with this id after `after` (0: from the start); 0 if none. */
u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 after);
void line_bdf(struct line *l, const struct pci_dev *d); /* ssss:bb:dd.f */
void res_bdf(struct result *r, const struct pci_dev *d);

/* ---- virtio.c: virtio 1.x over PCI (modern), split virtqueues ---- */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_ID_MEM 24
#define VIRTIO_ID_FS 26
#define VIRTIO_ID_PMEM 27
#define VIRTIO_ID_WATCHDOG 35 /* Cloud Hypervisor's virtio-watchdog */

#define VIRTIO_F_INDIRECT_DESC (1ULL << 28)
#define VIRTIO_F_VERSION_1 (1ULL << 32)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

#define VQ_SIZE_MAX 256 /* our cap on queue_size */
#define VQ_MAX 16       /* queues per device we set up at most */
#define VDEV_MAX 16
#define VIRTIO_NO_VECTOR 0xffff

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[];
};
struct vring_used_elem {
    u32 id;
    u32 len;
};
struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[];
};

struct virtq {
    u16 index, size;
    u64 notify; /* address the queue index is written to */
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    u16 avail_idx, last_used;
    u16 next_desc; /* where the next chain starts (one request in flight) */
    u16 head;      /* chain in flight, if busy */
    u32 wlen;      /* its device-writable bytes */
    u32 tlen;      /* all its bytes */
    bool lax_len;  /* accept a used len up to tlen (Cloud Hypervisor's balloon) */
    bool busy;
    u16 vector; /* MSI-X table entry or VIRTIO_NO_VECTOR */
    u8 *mem;    /* ring pages, allocated once per device and queue */
};

struct vdev {
    struct pci_dev *pci;
    u32 type;
    u64 common, isr, devcfg, notify; /* mapped addresses */
    u32 common_len, devcfg_len, notify_len, notify_mult;
    u64 features; /* negotiated */
    u16 num_queues; /* as the device reports */
    u16 nq;         /* queues set up */
    struct virtq q[VQ_MAX];
    u8 msix_cap;    /* 0 if MSI-X is not in use */
    u64 msix_table;
    u32 irq_base;   /* IDT vector of MSI-X entry 0 (config); queue i: irq_base + q[i].vector */
    u16 vq_first;   /* first queue with an MSI-X vector */
};

struct vbuf {
    u64 addr;
    u32 len;
    bool write; /* device-writable */
};

/* Virtio devices of this type, in PCI order. Returns the count, or -1 (r filled). */
int virtio_find(u32 type, struct vdev **out, u32 max, struct result *r);
/* Maps the BARs, resets, ACKNOWLEDGE, DRIVER, features (VERSION_1 | want & offered),
 * FEATURES_OK (re-read). v->num_queues is then what the device reports. */
bool virtio_init(struct vdev *v, u64 want, struct result *r);
/*
 * Queues 0..nq-1 (size min(device max, VQ_SIZE_MAX)), then DRIVER_OK.
 * irq_base != 0: MSI-X with entry 0 for config and entry 1 + i - vq_first
 * for queue i >= vq_first (queues below get none), delivered as IDT vector
 * irq_base + entry; irq_base 0: polled (NO_INTERRUPT).
 */
bool virtio_queues(struct vdev *v, u16 nq, u32 irq_base, u16 vq_first, struct result *r);
bool virtio_start(struct vdev *v, u64 want, u16 nq, struct result *r); /* both, polled */
void virtio_stop(struct vdev *v); /* reset; MSI-X off */
bool virtio_check_status(struct vdev *v, struct result *r); /* DEVICE_NEEDS_RESET, FAILED */
/* Device config bytes (generation-checked by the caller where it matters). */
u32 virtio_cfg32(struct vdev *v, u32 off);
u16 virtio_cfg16(struct vdev *v, u32 off);
u8 virtio_cfg8(struct vdev *v, u32 off);
u8 virtio_cfg_gen(struct vdev *v);
/* One chain on q (one request in flight per queue); notifies the device. */
bool vq_submit(struct vdev *v, struct virtq *q, const struct vbuf *b, u32 n, struct result *r);
/* Waits (TSC timeout) for the request in flight on q; *len = used.len, checked. */
bool vq_wait(struct vdev *v, struct virtq *q, u32 *len, u64 timeout_ms, struct result *r);
/* Takes the completion if there is one: 1 done, 0 not yet, -1 error. */
int vq_poll(struct vdev *v, struct virtq *q, u32 *len, struct result *r);
void res_vdev(struct result *r, const struct vdev *v); /* " bdf=..." */
/* Receive-style buffers, many in flight: descriptor `id` (one device-writable
 * buffer) made available; vq_notify tells the device. */
void vq_post_writable(struct virtq *q, u16 id, u64 addr, u32 len);
void vq_notify(struct virtq *q);

/* ---- blk.c: helpers the msix step shares ---- */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
/* virtio_init with the features blk uses; *nq: the queues to set up (num_queues, at most VQ_MAX). */
bool blk_negotiate(struct vdev *v, u16 *nq, struct result *r);
bool blk_submit(struct vdev *v, u16 qi, u32 type, u64 sector, void *buf, u32 len, struct result *r);
u8 blk_status(u16 qi); /* status byte of queue qi's last request (0xff: not written) */

/* ---- user.c: buffer work and the blkbench loop, at CPL3 ---- */
#define BLK_PATTERN 0x564d4b4954000000ULL /* qword j of sector s: BLK_PATTERN ^ (s << 16) ^ j */
enum { BUF_FNV, BUF_FILL, BUF_CHECK, BUF_CMP, BUF_ZERO, BUF_NOT /* addr = ~addr2 */, BUF_ISZERO };
struct buf_job {
    u32 op;
    u64 addr, addr2, len; /* addr2: the other buffer of BUF_CMP */
    u64 sector;           /* first sector of the pattern (BUF_FILL, BUF_CHECK) */
    u64 hash;             /* BUF_FNV: FNV-1a 64 */
    u32 bad;              /* BUF_CHECK, BUF_CMP: a mismatch at bad_off */
    u64 bad_off, expected, found;
};
u64 user_buf(void *job);

enum { BENCH_READ, BENCH_WRITE, BENCH_RANDREAD };
enum { BENCH_OK, BENCH_TIMEOUT, BENCH_BAD_ID, BENCH_BAD_LEN, BENCH_BAD_STATUS, BENCH_BAD_IDX };
struct bench_job {
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    u64 notify;
    u16 qindex, qsize;
    u16 avail_idx, last_used;
    bool indirect;      /* one descriptor per request, pointing at a table of 3 */
    u64 hdrs;           /* depth x 16-byte request headers */
    u64 status;         /* depth status bytes, 4 apart */
    u64 tables;         /* depth x 3 descriptors (indirect) */
    u64 data;           /* depth x size */
    u8 *inflight;       /* depth flags */
    u32 mode, depth;
    u64 size, count, cap_sectors;
    u64 timeout;        /* TSC ticks without a completion */
    bool lax_len;       /* writes: accept a used len up to the data length + 1 */
    /* results */
    u64 tsc, done;
    u32 err;
    u64 err_a, err_b;
};
u64 user_blkbench(void *job);

/* ---- user.c: a vsock connection's data at CPL3 (vsock_cpl3=1) ---- */
enum { VJ_SINK, VJ_SOURCE, VJ_ECHO };
enum { VJ_OK, VJ_TIMEOUT, VJ_BAD_USED, VJ_STOPPED /* a packet for CPL0, left on the ring */ };
struct vsock_ring {
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    u64 notify;
    u16 qindex, size, avail_idx, last_used;
};
struct vsock_job {
    struct vsock_ring rx, tx;
    u64 rx_mem;  /* VSOCK_RX_BUFS x 4096: rx descriptor i is buffer i */
    u32 nrx;
    u64 tx_mem;  /* ntx slots of 4096: tx descriptor i is slot i */
    u32 ntx;
    u32 mode;
    u64 cid;
    u32 local, peer, buf_alloc;
    u64 bytes;   /* to receive (sink, echo) or to send (source) */
    u64 timeout; /* TSC ticks without progress */
    u64 got, sent, reported; /* bytes received, sent; got as the host last heard it */
    u32 peer_buf_alloc, peer_fwd_cnt;
    u32 err;
    u16 stop_op;
};
u64 user_vsock(void *job);

#endif
