/*
 * virtio-mem: the virtiomem step. Finds the virtio-mem device, reads its
 * config (block_size, addr, region_size, plugged_size, requested_size; node_id
 * where the device offers VIRTIO_MEM_F_ACPI_PXM) and
 * follows requested_size: PLUG requests for blocks from the region's start
 * (each block read as zeros, then the blk pattern written and read back,
 * every plugged block checked again after each change), UNPLUG requests
 * from the top. Once plugged_size matches it prints "virtiomem waiting
 * requested=..." and halts until the config-change interrupt (MSI-X config
 * vector) brings a new requested_size; it is done when something was
 * plugged and all of it is unplugged again. The region is mapped write-back
 * and user-accessible: the memory loops run at CPL3 (user.c).
 *
 * virtiomem_wait=0: plug requested_size, check it, UNPLUG_ALL, and done.
 * virtiomem_hostile=1: the same after a series of requests the device must
 * refuse (outside the region, unaligned, wrapping, too many blocks, unknown
 * types, malformed chains), each answer checked.
 */
#include "pci.h"

#define VIRTIO_MEM_F_ACPI_PXM 1ULL /* node_id is valid */
#define REQ_PLUG 0
#define REQ_UNPLUG 1
#define REQ_UNPLUG_ALL 2
#define REQ_STATE 3
#define RESP_ACK 0
#define RESP_NACK 1
#define RESP_ERROR 3
#define STATE_PLUGGED 0
#define STATE_UNPLUGGED 1
#define NO_ANSWER 0xeeee
#define REQ_TIMEOUT_MS 2000
/* MSI-X: config on entry 0, the queue on entry 1 (IRQ_VECTOR_BASE + 20, 21). */
#define VMEM_IRQ_SLOT 20
#define MAX_BLOCKS 4096 /* 8 GiB of 2 MiB blocks */

struct vmem_req {
    u16 type, pad[3];
    u64 addr;
    u16 nb_blocks, pad2[3];
};
struct vmem_resp {
    u16 type, pad[3];
    u16 state, pad2[3]; /* 16 bytes: the device writes 10 */
};

static struct vmem_req vmem_request;
static struct vmem_resp vmem_response;
static u8 vmem_plugged[MAX_BLOCKS];

struct vmem {
    struct vdev *v;
    u64 block, addr, size, blocks;
    u64 plugged; /* blocks plugged, from the region's start */
};

static bool vmem_fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    res_vdev(r, v);
    return false;
}

static u64 cfg64(struct vdev *v, u32 off)
{
    return (u64)virtio_cfg32(v, off) | (u64)virtio_cfg32(v, off + 4) << 32;
}

/* One field, read within one config generation. */
static u64 vmem_cfg(struct vdev *v, u32 off)
{
    u64 value;
    u8 gen;
    u32 tries;
    for (tries = 0; tries < 10; tries++) {
        gen = virtio_cfg_gen(v);
        value = cfg64(v, off);
        if (virtio_cfg_gen(v) == gen)
            break;
    }
    return value;
}

/* Sends b[0..n) and returns the response type (NO_ANSWER if the device wrote
 * none), or -1 on a transport failure (r filled). */
static int vmem_send(struct vdev *v, const struct vbuf *b, u32 n, u32 *len, struct result *r)
{
    vmem_response.type = NO_ANSWER;
    vmem_response.state = NO_ANSWER;
    if (!vq_submit(v, &v->q[0], b, n, r) || !vq_wait(v, &v->q[0], len, REQ_TIMEOUT_MS, r))
        return -1;
    return vmem_response.type;
}

static int vmem_req(struct vdev *v, u16 type, u64 addr, u16 blocks, struct result *r)
{
    struct vbuf b[2];
    u32 len;
    int answer;
    vmem_request.type = type;
    vmem_request.addr = addr;
    vmem_request.nb_blocks = blocks;
    b[0].addr = (u64)&vmem_request;
    b[0].len = sizeof(vmem_request);
    b[0].write = false;
    b[1].addr = (u64)&vmem_response;
    b[1].len = sizeof(vmem_response);
    b[1].write = true;
    answer = vmem_send(v, b, 2, &len, r);
    if (answer >= 0 && len != 10) {
        res_str(r, "response length ");
        res_dec(r, len);
        vmem_fail(r, v, "");
        return -1;
    }
    return answer;
}

static void run_job(struct buf_job *j, u32 op, u64 addr, u64 len, u64 sector)
{
    j->op = op;
    j->addr = addr;
    j->addr2 = 0;
    j->len = len;
    j->sector = sector;
    run_user(user_buf, j);
}

static bool job_failed(struct result *r, struct vmem *m, struct buf_job *j, u64 base)
{
    res_str(r, "read back ");
    res_hex(r, j->found);
    res_str(r, " expected ");
    res_hex(r, j->expected);
    res_str(r, " at ");
    res_hex(r, base + j->bad_off);
    return vmem_fail(r, m->v, "");
}

/* Plugs block i: it must read as zeros; then the pattern goes in. */
static bool vmem_plug(struct vmem *m, u64 i, struct result *r)
{
    struct buf_job j;
    u64 at = m->addr + i * m->block;
    int answer = vmem_req(m->v, REQ_PLUG, at, 1, r);
    if (answer != RESP_ACK) {
        if (answer >= 0) {
            res_str(r, "PLUG answered ");
            res_dec(r, (u64)answer);
            res_str(r, " at ");
            res_hex(r, at);
            vmem_fail(r, m->v, "");
        }
        return false;
    }
    run_job(&j, BUF_ISZERO, at, m->block, 0);
    if (j.bad)
        return job_failed(r, m, &j, at);
    run_job(&j, BUF_FILL, at, m->block, i << 12);
    vmem_plugged[i] = 1;
    return true;
}

static bool vmem_unplug(struct vmem *m, u64 i, struct result *r)
{
    int answer = vmem_req(m->v, REQ_UNPLUG, m->addr + i * m->block, 1, r);
    if (answer != RESP_ACK) {
        if (answer >= 0) {
            res_str(r, "UNPLUG answered ");
            res_dec(r, (u64)answer);
            res_str(r, " at ");
            res_hex(r, m->addr + i * m->block);
            vmem_fail(r, m->v, "");
        }
        return false;
    }
    vmem_plugged[i] = 0;
    return true;
}

/* Every plugged block still holds its pattern. */
static bool vmem_check(struct vmem *m, struct result *r)
{
    struct buf_job j;
    u64 i;
    for (i = 0; i < m->plugged; i++) {
        u64 at = m->addr + i * m->block;
        run_job(&j, BUF_CHECK, at, m->block, i << 12);
        if (j.bad)
            return job_failed(r, m, &j, at);
    }
    return true;
}

/* Plugs or unplugs until plugged_size is requested_size. */
static bool vmem_follow(struct vmem *m, u64 requested, struct result *r)
{
    struct line l;
    u64 want = requested / m->block, device;
    if (want > m->blocks) {
        res_str(r, "requested_size past the region");
        return vmem_fail(r, m->v, "");
    }
    while (m->plugged < want) {
        if (!vmem_plug(m, m->plugged, r))
            return false;
        m->plugged++;
    }
    while (m->plugged > want) {
        if (!vmem_unplug(m, m->plugged - 1, r))
            return false;
        m->plugged--;
    }
    if (!vmem_check(m, r))
        return false;
    device = vmem_cfg(m->v, 40);
    if (device != m->plugged * m->block) {
        res_str(r, "plugged_size ");
        res_hex(r, device);
        res_str(r, " after plugging ");
        res_hex(r, m->plugged * m->block);
        return vmem_fail(r, m->v, "");
    }
    line_begin(&l);
    line_str(&l, "virtiomem plugged=");
    line_hex(&l, device);
    line_str(&l, " requested=");
    line_hex(&l, requested);
    line_str(&l, " verified=1");
    line_end(&l);
    return true;
}

/* Each of these the device must refuse with the answer given. */
static bool vmem_hostile(struct vmem *m, u64 requested, struct result *r)
{
    const struct {
        u16 type;
        u64 addr;
        u16 blocks;
        int answer;
    } bad[] = {
        {REQ_PLUG, m->addr + 4096, 1, RESP_ERROR},                    /* unaligned */
        {REQ_PLUG, m->addr - m->block, 1, RESP_ERROR},                /* below the region */
        {REQ_PLUG, m->addr + m->size, 1, RESP_ERROR},                 /* past its end */
        {REQ_PLUG, m->addr + m->size - m->block, 2, RESP_ERROR},      /* off its end */
        {REQ_PLUG, m->addr, 0, RESP_ERROR},                           /* no blocks */
        {REQ_PLUG, 0ULL - m->block, 1, RESP_ERROR},                   /* wrapping */
        {REQ_PLUG, m->addr, (u16)(requested / m->block + 1), RESP_NACK}, /* past requested */
        {REQ_PLUG, m->addr, 0xffff, RESP_NACK},                       /* larger than the region */
        {REQ_UNPLUG, m->addr, 1, RESP_ERROR},                         /* not plugged */
        {REQ_UNPLUG, 0, 1, RESP_ERROR},                               /* RAM */
        {REQ_STATE, m->addr + 1, 1, RESP_ERROR},
        {REQ_STATE, m->addr, 0xffff, RESP_ERROR},
        {7, m->addr, 1, RESP_ERROR},                                  /* unknown types */
        {0xffff, m->addr, 1, RESP_ERROR},
    };
    struct vbuf b[2];
    u32 i, len, answers = 0;
    int answer;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        answer = vmem_req(m->v, bad[i].type, bad[i].addr, bad[i].blocks, r);
        if (answer < 0)
            return false;
        if (answer != bad[i].answer) {
            res_str(r, "hostile request ");
            res_dec(r, i);
            res_str(r, " answered ");
            res_dec(r, (u64)answer);
            return vmem_fail(r, m->v, "");
        }
        answers++;
    }
    /* Malformed chains: a short request (ERROR), a device-writable request
     * (ERROR), a response buffer too short (no answer, used length 0). */
    vmem_request.type = REQ_PLUG;
    vmem_request.addr = m->addr;
    vmem_request.nb_blocks = 1;
    b[0].addr = (u64)&vmem_request;
    b[1].addr = (u64)&vmem_response;
    b[1].write = true;
    b[0].write = false;
    b[0].len = 16;
    b[1].len = 16;
    answer = vmem_send(m->v, b, 2, &len, r);
    if (answer != RESP_ERROR || len != 10)
        return vmem_fail(r, m->v, "a 16-byte request was not answered ERROR");
    b[0].len = 24;
    b[0].write = true;
    answer = vmem_send(m->v, b, 2, &len, r);
    if (answer != RESP_ERROR || len != 10)
        return vmem_fail(r, m->v, "a device-writable request was not answered ERROR");
    b[0].write = false;
    b[1].len = 8;
    answer = vmem_send(m->v, b, 2, &len, r);
    if (answer != NO_ANSWER || len != 0)
        return vmem_fail(r, m->v, "a request with an 8-byte response buffer was carried out");
    answers += 3;
    if (vmem_cfg(m->v, 40) != 0)
        return vmem_fail(r, m->v, "a hostile request plugged memory");
    res_kv_dec(r, "hostile", answers);
    return true;
}

static bool vmem_run(struct vdev *v, struct result *r)
{
    struct vmem m = {v, 0, 0, 0, 0, 0};
    struct line l;
    u64 requested, seen_max = 0, deadline;
    u32 slot = VMEM_IRQ_SLOT, interrupts = 0;
    int answer;

    if (!virtio_init(v, VIRTIO_MEM_F_ACPI_PXM, r))
        return false;
    if (!v->devcfg || v->devcfg_len < 56)
        return vmem_fail(r, v, "no usable virtio-mem device config");
    m.block = vmem_cfg(v, 0);
    m.addr = vmem_cfg(v, 16);
    m.size = vmem_cfg(v, 24);
    requested = vmem_cfg(v, 48);
    if (!m.block || m.block % (2ULL << 20) || m.addr % m.block || !m.size || m.size % m.block ||
        m.size / m.block > MAX_BLOCKS)
        return vmem_fail(r, v, "virtio-mem config out of range");
    m.blocks = m.size / m.block;
    line_begin(&l);
    line_str(&l, "virtiomem dev addr=");
    line_hex(&l, m.addr);
    line_str(&l, " region_size=");
    line_hex(&l, m.size);
    line_str(&l, " block_size=");
    line_hex(&l, m.block);
    line_str(&l, " usable=");
    line_hex(&l, vmem_cfg(v, 32));
    line_str(&l, " plugged=");
    line_hex(&l, vmem_cfg(v, 40));
    line_str(&l, " requested=");
    line_hex(&l, requested);
    if (v->features & VIRTIO_MEM_F_ACPI_PXM) {
        line_str(&l, " node_id=");
        line_dec(&l, virtio_cfg16(v, 8));
    }
    line_end(&l);
    if (!lapic_usable(r))
        return false;
    idt_install(IRQ_VECTOR_BASE + slot, irq_stubs[slot]);
    idt_install(IRQ_VECTOR_BASE + slot + 1, irq_stubs[slot + 1]);
    if (!virtio_queues(v, 1, IRQ_VECTOR_BASE + slot, 0, r))
        return false;
    if (!map_memory(m.addr, m.size) || !user_mapped(m.addr, m.size))
        return vmem_fail(r, v, "cannot map the region");
    /* What a previous driver left plugged goes first, as Linux does. */
    if (vmem_cfg(v, 40)) {
        answer = vmem_req(v, REQ_UNPLUG_ALL, 0, 0, r);
        if (answer != RESP_ACK)
            return answer < 0 ? false : vmem_fail(r, v, "UNPLUG_ALL refused");
    }
    if (cfg.virtiomem_hostile && !vmem_hostile(&m, requested, r))
        return false;
    if (cfg.virtiomem_hostile || !cfg.virtiomem_wait) {
        if (!vmem_follow(&m, requested, r))
            return false;
        answer = vmem_req(v, REQ_STATE, m.addr, (u16)m.plugged, r);
        if (m.plugged && (answer != RESP_ACK || vmem_response.state != STATE_PLUGGED))
            return answer < 0 ? false : vmem_fail(r, v, "STATE of the plugged blocks");
        answer = vmem_req(v, REQ_UNPLUG_ALL, 0, 0, r);
        if (answer != RESP_ACK || vmem_cfg(v, 40) != 0)
            return answer < 0 ? false : vmem_fail(r, v, "UNPLUG_ALL failed");
        res_kv_dec(r, "plugged_max", m.plugged * m.block);
        return virtio_check_status(v, r);
    }
    for (;;) {
        if (!vmem_follow(&m, requested, r))
            return false;
        if (m.plugged * m.block > seen_max)
            seen_max = m.plugged * m.block;
        if (seen_max && !m.plugged)
            break;
        /* Halt until the config interrupt and a new requested_size. */
        irq_counts[slot] = 0;
        line_begin(&l);
        line_str(&l, "virtiomem waiting requested=");
        line_hex(&l, requested);
        line_end(&l);
        lapic_tick_start(1000000); /* bounds each hlt */
        deadline = rdtsc() + ms_to_tsc(cfg.virtiomem_timeout_ms);
        for (;;) {
            cli();
            if ((irq_counts[slot] && vmem_cfg(v, 48) != requested) || rdtsc() > deadline)
                break;
            __asm__ volatile("sti; hlt" ::: "memory"); /* sti's shadow covers hlt */
        }
        cli();
        lapic_tick_stop();
        if (!irq_counts[slot]) {
            res_str(r, "no config interrupt within ");
            res_dec(r, cfg.virtiomem_timeout_ms);
            return vmem_fail(r, v, " ms");
        }
        interrupts++;
        requested = vmem_cfg(v, 48);
        line_begin(&l);
        line_str(&l, "virtiomem config interrupt requested=");
        line_hex(&l, requested);
        line_end(&l);
    }
    res_kv_dec(r, "plugged_max", seen_max);
    res_kv_dec(r, "interrupts", interrupts);
    return virtio_check_status(v, r);
}

bool step_virtiomem(struct result *r)
{
    struct vdev *v;
    int n;
    bool ok;

    if (cfg.virtiomem_bad || !cfg.virtiomem_timeout_ms) {
        res_str(r, "bad virtiomem_timeout_ms or virtiomem_hostile value");
        return false;
    }
    n = virtio_find(VIRTIO_ID_MEM, &v, 1, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-mem device");
        return false;
    }
    ok = vmem_run(v, r);
    virtio_stop(v);
    return ok;
}
