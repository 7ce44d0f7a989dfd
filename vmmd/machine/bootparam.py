"""The x86 Linux boot protocol's structures: struct setup_header, struct boot_e820_entry, struct boot_params.

Mirrors arch/x86/include/uapi/asm/bootparam.h (installed as asm/bootparam.h) field for field under the
kernel's names; tests/test_layout.py compiles that header and compares every size and offset. The meaning
of each field is Documentation/arch/x86/boot.rst ("The real-mode kernel header", "Zero page").
"""

from __future__ import annotations

import ctypes

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6
E820_MAX_ENTRIES_ZEROPAGE = 128

# boot.rst values that are not macros in the header
SETUP_HEADER_OFFSET = 0x1F1  # where the setup header sits in the image and in boot_params
HDRS_MAGIC = 0x53726448  # "HdrS" at 0x202
BOOT_FLAG_MAGIC = 0xAA55  # at 0x1FE
TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst "type_of_loader": 0xFF for a loader without an assigned ID
# asm/e820/types.h (E820_TYPE_RAM 1, E820_TYPE_RESERVED 2): the boot protocol's e820 types
E820_TYPE_RAM = 1
E820_TYPE_RESERVED = 2


class setup_header(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("setup_sects", u8), ("root_flags", u16), ("syssize", u32), ("ram_size", u16), ("vid_mode", u16),
                ("root_dev", u16), ("boot_flag", u16), ("jump", u16), ("header", u32), ("version", u16),
                ("realmode_swtch", u32), ("start_sys_seg", u16), ("kernel_version", u16), ("type_of_loader", u8),
                ("loadflags", u8), ("setup_move_size", u16), ("code32_start", u32), ("ramdisk_image", u32),
                ("ramdisk_size", u32), ("bootsect_kludge", u32), ("heap_end_ptr", u16), ("ext_loader_ver", u8),
                ("ext_loader_type", u8), ("cmd_line_ptr", u32), ("initrd_addr_max", u32),
                ("kernel_alignment", u32), ("relocatable_kernel", u8), ("min_alignment", u8),
                ("xloadflags", u16), ("cmdline_size", u32), ("hardware_subarch", u32),
                ("hardware_subarch_data", u64), ("payload_offset", u32), ("payload_length", u32),
                ("setup_data", u64), ("pref_address", u64), ("init_size", u32), ("handover_offset", u32),
                ("kernel_info_offset", u32)]


class boot_e820_entry(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


class boot_params(ctypes.Structure):
    """The zero page. Members vmmd never sets are kept as byte arrays of the header's sizes, so every offset
    (commented as in the header) is where the kernel reads it."""

    _pack_ = 1
    _fields_ = [("screen_info", u8 * 0x40),  # 0x000
                ("apm_bios_info", u8 * 0x14),  # 0x040
                ("_pad2", u8 * 4),  # 0x054
                ("tboot_addr", u64),  # 0x058
                ("ist_info", u8 * 0x10),  # 0x060
                ("acpi_rsdp_addr", u64),  # 0x070
                ("_pad3", u8 * 8),  # 0x078
                ("hd0_info", u8 * 16), ("hd1_info", u8 * 16),  # 0x080, 0x090
                ("sys_desc_table", u8 * 0x10),  # 0x0a0
                ("olpc_ofw_header", u8 * 0x10),  # 0x0b0
                ("ext_ramdisk_image", u32), ("ext_ramdisk_size", u32), ("ext_cmd_line_ptr", u32),  # 0x0c0..
                ("_pad4", u8 * 112),  # 0x0cc
                ("cc_blob_address", u32),  # 0x13c
                ("edid_info", u8 * 0x80),  # 0x140
                ("efi_info", u8 * 0x20),  # 0x1c0
                ("alt_mem_k", u32), ("scratch", u32),  # 0x1e0, 0x1e4
                ("e820_entries", u8), ("eddbuf_entries", u8), ("edd_mbr_sig_buf_entries", u8),  # 0x1e8..
                ("kbd_status", u8), ("secure_boot", u8), ("_pad5", u8 * 2),  # 0x1eb..
                ("sentinel", u8), ("_pad6", u8 * 1),  # 0x1ef, 0x1f0
                ("hdr", setup_header),  # 0x1f1
                ("_pad7", u8 * (0x290 - 0x1F1 - ctypes.sizeof(setup_header))),
                ("edd_mbr_sig_buffer", u32 * 16),  # 0x290
                ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
                ("_pad8", u8 * 48),  # 0xcd0
                ("eddbuf", u8 * (6 * 0x52)),  # 0xd00: struct edd_info[EDDMAXNR]
                ("_pad9", u8 * 276)]  # 0xeec


assert ctypes.sizeof(boot_params) == 4096

LAYOUT_HEADERS = ["asm/bootparam.h"]
LAYOUT_STRUCTS = [setup_header, boot_e820_entry, boot_params]
LAYOUT_CONSTANTS = ["LOADED_HIGH", "KASLR_FLAG", "QUIET_FLAG", "KEEP_SEGMENTS", "CAN_USE_HEAP", "XLF_KERNEL_64",
                    "XLF_CAN_BE_LOADED_ABOVE_4G", "XLF_EFI_HANDOVER_32", "XLF_EFI_HANDOVER_64", "XLF_EFI_KEXEC",
                    "XLF_5LEVEL", "XLF_5LEVEL_ENABLED", "E820_MAX_ENTRIES_ZEROPAGE"]
