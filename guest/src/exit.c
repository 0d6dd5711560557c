/*
 * Leaving the VM the ways a real guest does: ACPI S5, i8042 reset, ACPI
 * reset register, triple fault, or spinning/halting for the VMM to notice.
 */
#include "guest.h"

/* Writes val to an ACPI Generic Address Structure (I/O, memory or PCI config). */
static bool gas_write(u64 gas, u32 val)
{
    u8 space = rd8(gas), width = rd8(gas + 1);
    u64 addr = rd64(gas + 4);
    if (!addr)
        return false;
    if (space == 1) { /* system I/O */
        if (width == 16)
            outw((u16)addr, (u16)val);
        else if (width == 32)
            outl((u16)addr, val);
        else
            outb((u16)addr, (u8)val);
        return true;
    }
    if (space == 0 && range_mapped(addr, 4)) { /* system memory */
        if (width == 16)
            *(volatile u16 *)addr = (u16)val;
        else if (width == 32)
            *(volatile u32 *)addr = val;
        else
            *(volatile u8 *)addr = (u8)val;
        return true;
    }
    if (space == 2) { /* PCI config space of bus 0: dev << 32 | fn << 16 | offset */
        u32 dev = (u32)(addr >> 32) & 0x1f, fn = (u32)(addr >> 16) & 7, off = (u32)addr & 0xff;
        outl(0xcf8, 0x80000000u | (dev << 11) | (fn << 8) | (off & 0xfc));
        outb((u16)(0xcfc + (off & 3)), (u8)val);
        return true;
    }
    return false;
}

/* SLP_TYP for S5 from the DSDT (searched at CPL3); 5 if not found. */
static u32 s5_slp_typ(const struct acpi_info *a)
{
    struct s5_job j;
    if (!a->dsdt || !user_mapped(a->dsdt, a->dsdt_len))
        return 5;
    j.addr = a->dsdt + 36;
    j.len = a->dsdt_len - 36;
    j.slp_typ = 5;
    run_user(user_find_s5, &j);
    return j.found ? j.slp_typ & 7 : 5;
}

static void acpi_poweroff(void)
{
    const struct acpi_info *a = acpi_discover();
    u64 f = a->fadt;
    u32 slp_typ, port, i;

    if (!a->ok || !f)
        return;
    slp_typ = s5_slp_typ(a);
    /* HW_REDUCED_ACPI with a SLEEP_CONTROL_REG: SLP_TYPx in bits 4:2, SLP_EN = bit 5. */
    if ((rd32(f + 112) & (1u << 20)) && a->fadt_len >= 256 && rd64(f + 244 + 4)) {
        gas_write(f + 244, (slp_typ << 2) | 0x20);
        return;
    }
    port = rd32(f + 64); /* PM1a_CNT_BLK */
    if (!port && a->fadt_len >= 184 && rd8(f + 172) == 1)
        port = (u32)rd64(f + 172 + 4); /* X_PM1a_CNT_BLK (I/O) */
    if (!port)
        return;
    /* Legacy ACPI: switch to ACPI mode first if SCI_EN is clear (SMI_CMD <- ACPI_ENABLE). */
    if (rd32(f + 48) && rd8(f + 52) && !(inw((u16)port) & 1)) {
        outb((u16)rd32(f + 48), rd8(f + 52));
        for (i = 0; i < 1000 && !(inw((u16)port) & 1); i++)
            cpu_relax();
    }
    outw((u16)port, (u16)((slp_typ << 10) | 0x2000)); /* SLP_TYPx, SLP_EN */
}

static void acpi_reset(void)
{
    const struct acpi_info *a = acpi_discover();
    if (a->ok && a->fadt && a->fadt_len >= 129)
        gas_write(a->fadt + 116, rd8(a->fadt + 128)); /* RESET_REG <- RESET_VALUE */
}

NORETURN void do_exit(const char *how, size_t len)
{
    struct line l;
    u64 deadline;

    line_begin(&l);
    line_str(&l, "exit ");
    line_strn(&l, how, len);
    line_end(&l);

    if (word_eq(how, len, "poweroff")) {
        acpi_poweroff();
    } else if (word_eq(how, len, "reset")) {
        u32 i;
        for (i = 0; i < 1000 && (inb(0x64) & 0x02); i++) /* input buffer full: wait */
            cpu_relax();
        outb(0x64, 0xfe); /* i8042: pulse the reset line */
    } else if (word_eq(how, len, "acpi-reset")) {
        acpi_reset();
    } else if (word_eq(how, len, "triple-fault")) {
        triple_fault();
    } else if (word_eq(how, len, "hang")) {
        __asm__ volatile("cli\n1: jmp 1b" ::: "memory");
    } else if (word_eq(how, len, "halt")) {
        halt_forever();
    }

    /* The VMM may act on the request asynchronously (QEMU does): give it time. */
    deadline = rdtsc() + ms_to_tsc(200);
    while (rdtsc() < deadline)
        cpu_relax();
    line_begin(&l);
    line_str(&l, "exit ");
    line_strn(&l, how, len);
    line_str(&l, " failed");
    line_end(&l);
    halt_forever();
}
