/* The IOAPIC at 0xfec00000 (vmkit's is in user space, beside KVM's split
 * irqchip) and the ioapic step: its registers, and COM1's pin 4 delivering,
 * dropping and re-delivering interrupts as the guest programs it.
 *
 * The step makes its own interrupts with the UART in loopback mode: each
 * byte written comes back as received data, and with the received-data
 * interrupt enabled, the UART raises its line once per byte. Nothing reaches
 * the console meanwhile, so the step prints only after leaving loopback.
 */
#include "guest.h"

#define IOAPIC_BASE 0xfec00000ULL
#define IOAPIC_REG_ID 0x00
#define IOAPIC_REG_VERSION 0x01

#define COM1 0x3f8
#define UART_DATA (COM1 + 0)
#define UART_IER (COM1 + 1)
#define UART_MCR (COM1 + 4)
#define UART_LSR (COM1 + 5)
#define IER_RECEIVED_DATA 0x01
#define MCR_OUT2 0x08
#define MCR_LOOP 0x10
#define LSR_DATA_READY 0x01
#define SERIAL_PIN 4
#define IOAPIC_TEST_VECTOR (IRQ_VECTOR_BASE + IRQ_VECTORS - 2)

bool ioapic_map(void) { return map_mmio(IOAPIC_BASE, 0x20, false); }

u32 ioapic_read(u32 reg)
{
    mmio_write32(IOAPIC_BASE, reg);
    return mmio_read32(IOAPIC_BASE + 0x10);
}

void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}

/* Redirection entry: fixed delivery, physical destination, active high;
 * `flags` adds ENTRY_MASKED and/or ENTRY_LEVEL. Destination first, as Linux. */
void ioapic_route(u32 pin, u32 vector, u32 apic_id, u32 flags)
{
    ioapic_write(0x10 + 2 * pin + 1, apic_id << 24);
    ioapic_write(0x10 + 2 * pin, vector | flags);
}

static void drain_uart(void)
{
    while (inb(UART_LSR) & LSR_DATA_READY)
        (void)inb(UART_DATA);
}

/* Waits up to `ms` for the pin's count to reach `want`; returns the count. */
static u32 wait_irqs(u32 slot, u32 want, u64 ms)
{
    u64 deadline = rdtsc() + ms_to_tsc(ms);
    for (;;) {
        cli();
        if (irq_counts[slot] >= want || rdtsc() > deadline)
            break;
        __asm__ volatile("sti; hlt" ::: "memory"); /* the LAPIC tick bounds each hlt */
    }
    cli();
    return irq_counts[slot];
}

/* One byte through the loopback: one edge on COM1's line. */
static u32 edge_and_wait(u32 slot, u32 want, u64 ms)
{
    u32 n;
    outb(UART_DATA, 0x5a);
    n = wait_irqs(slot, want, ms);
    drain_uart();
    return n;
}

bool step_ioapic(struct result *r)
{
    u32 slot = IOAPIC_TEST_VECTOR - IRQ_VECTOR_BASE;
    u32 version, id, me, masked, edge, level, entry;
    u8 mcr;

    if (!lapic_usable(r))
        return false;
    if (!ioapic_map()) {
        res_str(r, "cannot map the IOAPIC");
        return false;
    }
    version = ioapic_read(IOAPIC_REG_VERSION);
    if ((version & 0xff) != 0x11 || ((version >> 16) & 0xff) != 23) {
        res_str(r, "version register=");
        res_hex(r, version);
        return false;
    }
    ioapic_write(IOAPIC_REG_ID, 5u << 24);
    id = ioapic_read(IOAPIC_REG_ID);
    ioapic_write(IOAPIC_REG_ID, 0);
    if (id != 5u << 24) {
        res_str(r, "ID register did not keep 5: ");
        res_hex(r, id);
        return false;
    }

    me = lapic_id();
    idt_install(IOAPIC_TEST_VECTOR, irq_stubs[slot]);
    mcr = inb(UART_MCR);
    ioapic_route(SERIAL_PIN, IOAPIC_TEST_VECTOR, me, ENTRY_MASKED);
    outb(UART_MCR, MCR_LOOP | MCR_OUT2);
    drain_uart();
    outb(UART_IER, IER_RECEIVED_DATA);
    irq_counts[slot] = 0;
    lapic_tick_start(1000000); /* bounds each hlt */

    /* Masked: the edge is dropped, and unmasking does not bring it back. */
    edge_and_wait(slot, 1, 20);
    ioapic_route(SERIAL_PIN, IOAPIC_TEST_VECTOR, me, 0);
    masked = wait_irqs(slot, 1, 20);
    /* Edge-triggered: one interrupt per edge. */
    irq_counts[slot] = 0;
    edge_and_wait(slot, 1, 1000);
    edge = edge_and_wait(slot, 2, 1000);
    /* Level-triggered: delivered; each EOI leaves the pin ready for the next. */
    ioapic_route(SERIAL_PIN, IOAPIC_TEST_VECTOR, me, ENTRY_LEVEL);
    irq_counts[slot] = 0;
    edge_and_wait(slot, 1, 1000);
    level = edge_and_wait(slot, 2, 1000);
    entry = ioapic_read(0x10 + 2 * SERIAL_PIN);

    ioapic_route(SERIAL_PIN, IOAPIC_TEST_VECTOR, me, ENTRY_MASKED);
    lapic_tick_stop();
    outb(UART_IER, 0);
    drain_uart();
    outb(UART_MCR, mcr);

    if (masked || edge != 2 || level != 2) {
        res_str(r, "interrupts: masked=");
        res_dec(r, masked);
        res_str(r, " edge=");
        res_dec(r, edge);
        res_str(r, " level=");
        res_dec(r, level);
        res_str(r, " (want 0, 2, 2)");
        return false;
    }
    /* After the EOIs, remote IRR is clear and the entry is as written. */
    if ((entry & 0x1ffff) != (IOAPIC_TEST_VECTOR | ENTRY_LEVEL)) {
        res_str(r, "pin 4 entry reads back as ");
        res_hex(r, entry);
        return false;
    }
    res_kv_hex(r, "version", version);
    res_str(r, " masked=0 edge=2 level=2");
    return true;
}
