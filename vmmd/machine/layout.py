"""Fixed guest-physical layout of a flat 64-bit firmware guest, and fixed ports.

The firmware side reads all of this from the boot-info page (firmware/include/
bootinfo.h); nothing in the guest hard-codes these addresses.
"""

BOOTINFO_GPA = 0x1000
GDT_GPA = 0x2000
PML4_GPA = 0x3000
PDPT_GPA = 0x4000  # first PDPT (0..512 GiB)
PT_LOW_GPA = 0x5000  # 4 KiB pages for the first 2 MiB
PD_BASE_GPA = 0x6000  # page directories, one per GiB mapped, up to 0xFFFF (10 GiB)
MAX_PD_PAGES = 10
GHCB_BASE_GPA = 0x10000  # GHCB page of vCPU n at GHCB_BASE_GPA + n * 4096 (up to LOW_AREA_VCPUS vCPUs)
LOW_AREA_VCPUS = 16  # vCPUs whose GHCB pages and stacks fit below 1 MiB; more get a vCPU area after the image
# The one vCPU limit of vmmd, for every image kind and command (run, measure, definitions); the host's KVM may
# allow fewer (KVM_CAP_MAX_VCPUS, checked when a VM is built). 254: guests address vCPUs by 8-bit xAPIC IDs
# (0xFF is the broadcast ID) in the CPUID topology vmmd presents (vmmd/machine/cpuid.py) and in the MP table
# of Linux guests, where the IOAPIC takes one more ID (vmmd/machine/mptable.py).
MAX_VCPUS = 254
SHARED_GPA = 0x20000  # shared buffers for devices (virtio rings) on SEV platforms
SHARED_SIZE = 0x40000
STACKS_GPA = 0x60000  # vCPU n's stack: [STACKS_GPA + n*STACK_SIZE, + STACK_SIZE) (up to LOW_AREA_VCPUS)
STACK_SIZE = 0x4000
# The page an attested launch's LAUNCH_SECRET fills (boot info secret_gpa; vmctl inject-secret's default for vmmd
# images): private memory just above the low-area stacks, zero unless a guest owner injected a secret.
SECRET_GPA = 0xA0000
SECRET_SIZE = 0x1000
FIRMWARE_LOAD_GPA = 0x100000  # flat images load and start here
RESET_VECTOR_MAX_BYTES = 16 << 20  # a reset-vector image (OVMF) ends at 4 GiB and may be this large

CONSOLE_PORT = 0x3F8  # COM1, 8 registers
CONSOLE_IRQ = 4  # COM1's ISA IRQ, raised through the in-kernel irqchip where the platform has one
DEBUG_EXIT_PORT = 0x501  # QEMU isa-debug-exit default iobase, 2 ports wide
DOORBELL_PORT = 0x0E80  # sev-es-emu VMGEXIT doorbell (advertised in CPUID 0x40000101 EAX)

# GDT selectors
CODE64_SELECTOR = 0x08
DATA_SELECTOR = 0x10

MMIO_TESTDEV_GPA = 0xFEB0_0000  # vmmd-testdev: one 4 KiB MMIO scratch page (below the IOAPIC at 0xFEC00000)
MMIO_TESTDEV_SIZE = 0x1000
VIRTIO_NET_MMIO_GPA = 0xFEB0_1000  # virtio-mmio register page of the virtio-net device (when --net is given)
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_NET_IRQ = 5  # ISA IRQ line used when an in-kernel irqchip exists
VIRTIO_BLK_MMIO_GPA = 0xFEB0_2000  # disk n's virtio-mmio register page: VIRTIO_BLK_MMIO_GPA + n * VIRTIO_MMIO_SIZE
VIRTIO_BLK_IRQS = (6, 7, 10, 11)  # disk n's ISA IRQ line (vmmd.block.image.MAX_DISKS disks at most)

# ACPI sleep control/status registers (hardware-reduced ACPI) of Linux guests: vmmd/machine/acpi.py describes
# them in the FADT, vmmd/devices/acpi_sleep.py answers them; SLP_TYP 5 (\_S5) is power off.
SLEEP_CONTROL_PORT = 0x600
SLEEP_TYPE_S5 = 5
