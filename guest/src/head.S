/*
 * Entry points, the GDT and the identity-mapping page tables.
 *
 * The image is linked at LOAD_ADDR (1 MiB) and has two entry points:
 *   +0x000  pvh_start32: PVH (32-bit protected mode, paging off, EBX = hvm_start_info)
 *   +0x200  startup_64:  Linux x86-64 boot protocol (long mode, RSI = boot_params)
 * Each first writes its marker to the debug port, then both switch to our
 * own GDT and page tables and meet in start_common (64-bit).
 *
 * Every CPL0 instruction is emulated (~0.55 us each on kvm_pvm), so the page
 * tables are mostly built at link time: the loader copies them for free.
 */
#include "layout.h"

/* Page table entry bits. */
#define PTE_P 0x001
#define PTE_RW 0x002
#define PTE_US 0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080
#define PTE_TABLE (PTE_P | PTE_RW | PTE_US)
#define PTE_RAM (PTE_P | PTE_RW | PTE_US | PTE_PS)          /* 2 MiB, WB, user-accessible */
#define PTE_MMIO (PTE_P | PTE_RW | PTE_PWT | PTE_PCD | PTE_PS) /* 2 MiB, UC, supervisor */

/* ------------------------------------------------------------------ */
    .section .head32, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    movb $DBG_PVH_ENTRY, %al            /* first thing: tell the VMM we are running */
    outb %al, $DEBUG_PORT
    cli
    cld
    movl %ebx, %esi                     /* hvm_start_info, kept for guest_main */
    lgdt boot_gdt_desc                  /* 32-bit lgdt reads limit + 32-bit base */
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0                     /* now in compatibility mode */
    ljmp $KERNEL_CS, $pvh_long          /* 64-bit code segment */

/* ------------------------------------------------------------------ */
    .section .head64, "ax"
    .code64
    .globl startup_64
startup_64:
    movb $DBG_LINUX64_ENTRY, %al        /* first thing: tell the VMM we are running */
    outb %al, $DEBUG_PORT
    cli
    cld
    lgdt boot_gdt_desc(%rip)            /* the VMM's GDT may live in memory we reuse */
    leaq pml4(%rip), %rax
    movq %rax, %cr3                     /* our tables map all of 0-4 GiB */
    movl $BOOT_LINUX64, %edi            /* RSI = boot_params, kept */
    jmp start_common

/* ------------------------------------------------------------------ */
    .text
pvh_long:
    movl $BOOT_PVH, %edi
    movl %esi, %esi                     /* zero-extend the start_info address */
    /* fall through */
start_common:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    leaq boot_stack_top(%rip), %rsp
    pushq $KERNEL_CS                    /* reload CS from our GDT */
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    /* No .bss to clear: the linker script stores it in the image. */
    call guest_main
2:  cli
    hlt
    jmp 2b

/* ------------------------------------------------------------------ */
    .data
    .balign 16
    .globl boot_gdt
boot_gdt:
    .quad 0                             /* 0x00 null */
    .quad 0x00af9a000000ffff            /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff            /* 0x10 kernel data */
    .quad 0x00cff2000000ffff            /* 0x18 user data (DPL 3) */
    .quad 0x00affa000000ffff            /* 0x20 user code, 64-bit (DPL 3) */
    .quad 0, 0                          /* 0x28 TSS (16 bytes), filled in by cpu_tables_init */
    .globl boot_gdt_end
boot_gdt_end:
    .if boot_gdt_end - boot_gdt - GDT_SIZE
    .error "GDT_SIZE does not match the GDT"
    .endif

    .balign 16
    .globl boot_gdt_desc
boot_gdt_desc:
    .word GDT_SIZE - 1
    .quad boot_gdt

/*
 * Identity map, 2 MiB pages. Built at link time:
 *   0 - 3 GiB: write-back, user-accessible (trimmed to the RAM top by mm_init)
 *   3 - 4 GiB: the MMIO hole (LAPIC, IOAPIC, ...), uncached, supervisor only
 * mm_init adds page directories for RAM above 4 GiB.
 */
    .section .data.pgt, "aw"
    .balign 4096
    .globl pml4, pdpt, pd_low, pd_hole
pml4:
    .quad pdpt + PTE_TABLE
    .fill 511, 8, 0
pdpt:
    .quad pd_low + PTE_TABLE
    .quad pd_low + 0x1000 + PTE_TABLE
    .quad pd_low + 0x2000 + PTE_TABLE
    .quad pd_hole + PTE_TABLE
    .fill 508, 8, 0
pd_low:
    .set i, 0
    .rept 3 * 512
    .quad (i << 21) + PTE_RAM
    .set i, i + 1
    .endr
pd_hole:
    .set i, 0
    .rept 512
    .quad 0xc0000000 + (i << 21) + PTE_MMIO
    .set i, i + 1
    .endr

/* ------------------------------------------------------------------ */
    .bss
    .balign 4096
boot_stack:
    .skip BOOT_STACK_SIZE
    .globl boot_stack_top
boot_stack_top:
