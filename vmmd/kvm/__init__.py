"""The KVM layer: ABI mirrors (uapi, ioctls), the Kvm / Vm / Vcpu fd classes, decoded exits."""

from vmmd.kvm.system import Kvm, KvmError, Vcpu, Vm

__all__ = ["Kvm", "KvmError", "Vcpu", "Vm"]
