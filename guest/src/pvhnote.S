/*
 * XEN_ELFNOTE_PHYS32_ENTRY: tells PVH loaders (rust-vmm linux-loader, QEMU,
 * Cloud Hypervisor, Firecracker) the 32-bit physical entry point.
 * Linked only into vmkit-guest.elf; vmkit-guest-nopvh.elf is the same image
 * without this object, which makes loaders fall back to the 64-bit entry.
 *
 * The descriptor is 8 bytes like Linux's (QEMU 7.x reads 8 bytes from
 * ELF64 notes; linux-loader reads the low 4).
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.Xen, "a", @note
    .balign 4
    .long 2f - 1f                       /* n_namesz */
    .long 4f - 3f                       /* n_descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY      /* n_type */
1:  .asciz "Xen"
2:  .balign 4
3:  .quad pvh_start32
4:  .balign 4
