/*
 * Copies what the VMM handed over (command line, memory map, RSDP address,
 * initramfs/modules) out of the boot structures before anything else can
 * overwrite them: they live in low memory (e.g. 0x6000/0x7000 and the
 * command line at 0x20000 in Cloud Hypervisor's layout).
 */
#include "guest.h"

struct boot_info boot;

/* Only what the boot page tables map (0-3 GiB, write-back) is read. */
static bool boot_readable(u64 addr, u64 len) { return addr && addr < 3 * GiB && len <= 3 * GiB - addr; }

static void copy_cmdline(u64 addr)
{
    u32 n = 0, max = CMDLINE_MAX;
    if (boot_readable(addr, 1)) {
        const char *s = (const char *)addr;
        if (addr + max > 3 * GiB)
            max = (u32)(3 * GiB - addr);
        while (n < max && s[n])
            n++;
        memcpy(boot.cmdline, s, n);
    }
    boot.cmdline[n] = 0;
    boot.cmdline_len = n;
}

static void add_range(u64 start, u64 size, u32 type)
{
    if (boot.nmap < MEMMAP_MAX) {
        struct mem_range *m = &boot.map[boot.nmap++];
        m->start = start;
        m->size = size;
        m->type = type;
    }
    if (type == 1 && start + size > boot.ram_top)
        boot.ram_top = start + size;
}

static void add_module(u64 start, u64 size)
{
    if (size && boot.nmods < MODULES_MAX) {
        boot.mods[boot.nmods].start = start;
        boot.mods[boot.nmods].size = size;
        boot.nmods++;
    }
}

/* struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) */
#define HVM_START_MAGIC 0x336ec578

static void copy_pvh(u64 si)
{
    u32 i, n;
    if (!boot_readable(si, 56) || rd32(si) != HVM_START_MAGIC)
        return;
    copy_cmdline(rd64(si + 24));
    boot.rsdp = rd64(si + 32);
    n = rd32(si + 12); /* nr_modules; entries {paddr, size, cmdline_paddr, reserved} */
    if (n && boot_readable(rd64(si + 16), (u64)n * 32))
        for (i = 0; i < n; i++)
            add_module(rd64(rd64(si + 16) + i * 32), rd64(rd64(si + 16) + i * 32 + 8));
    if (rd32(si + 4) >= 1) { /* version 1 added memmap_paddr / memmap_entries */
        u64 mm = rd64(si + 40);
        n = rd32(si + 48); /* entries {addr, size, type, reserved} */
        if (boot_readable(mm, (u64)n * 24))
            for (i = 0; i < n; i++)
                add_range(rd64(mm + i * 24), rd64(mm + i * 24 + 8), rd32(mm + i * 24 + 16));
    }
}

/* struct boot_params (the zero page), Documentation/arch/x86/zero-page.rst */
static void copy_linux64(u64 bp)
{
    u32 i, n;
    u64 cmd, rd, rdsz;
    if (!boot_readable(bp, 4096))
        return;
    cmd = rd32(bp + 0x228) | ((u64)rd32(bp + 0x0c8) << 32); /* cmd_line_ptr + ext_ */
    copy_cmdline(cmd);
    boot.rsdp = rd64(bp + 0x070);                             /* acpi_rsdp_addr */
    rd = rd32(bp + 0x218) | ((u64)rd32(bp + 0x0c0) << 32);   /* ramdisk_image + ext_ */
    rdsz = rd32(bp + 0x21c) | ((u64)rd32(bp + 0x0c4) << 32); /* ramdisk_size + ext_ */
    if (rd)
        add_module(rd, rdsz);
    n = rd8(bp + 0x1e8); /* e820_entries; table at 0x2d0, 20-byte packed entries */
    if (n > 128)
        n = 128;
    for (i = 0; i < n; i++) {
        u64 e = bp + 0x2d0 + i * 20;
        add_range(rd64(e), rd64(e + 8), rd32(e + 16));
    }
}

void boot_copy_info(u32 protocol, u64 info)
{
    boot.protocol = protocol;
    boot.cmdline_len = 0;
    boot.cmdline[0] = 0;
    boot.nmap = 0;
    boot.nmods = 0;
    boot.rsdp = 0;
    boot.ram_top = 0;
    if (protocol == BOOT_PVH)
        copy_pvh(info);
    else
        copy_linux64(info);
}
