"""Compare ctypes mirrors with the C headers they mirror, by compiling a probe with gcc.

A module under check declares LAYOUT_HEADERS (headers to #include),
LAYOUT_STRUCTS (ctypes classes named as the C struct, or with a `_c_name_`),
LAYOUT_CONSTANTS (names of module attributes equal to C macros/enums) and
LAYOUT_ENUM_CONSTANTS (enumerators), optionally ADDED_IN {name: linux release} for items newer than the installed
headers may be (a struct by its Python name, a field as "struct kvm_run.hypercall.flags", a constant by its name),
and LAYOUT_INCLUDE_DIRS. `check_module(module, include_dirs=[...])` compiles against another header set (e.g. a
newer kernel's `make headers` output) searched before the module's own and the system's directories.
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LayoutReport:
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # "name (added in X)"
    missing: set[str] = field(default_factory=set)  # ADDED_IN keys these headers lack
    proven: set[str] = field(default_factory=set)  # ADDED_IN keys these headers have and that matched


def c_name(cls: type) -> str:
    return getattr(cls, "_c_name_", f"struct {cls.__name__}")


def field_paths(cls: type, prefix: str = "", base: int = 0):
    """Yield (c_path, offset, size) for every field, recursing into nested structs/unions."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for entry in cls._fields_:
        name, ftype = entry[0], entry[1]
        descriptor = getattr(cls, name)
        offset = base + descriptor.offset
        if name in anonymous:
            yield from field_paths(ftype, prefix, offset)
            continue
        path = f"{prefix}{name}"
        yield path, offset, ctypes.sizeof(ftype)
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            yield from field_paths(ftype, path + ".", offset)


def _compiles(headers: list[str], include_dirs: list[str], body: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("".join(f"#include <{h}>\n" for h in headers) + f"int main(void) {{ {body}; return 0; }}\n")
        args = ["gcc", "-fsyntax-only", *[f"-I{d}" for d in include_dirs], str(src)]
        return subprocess.run(args, capture_output=True).returncode == 0


def check_module(module, structs=None, include_dirs: list[str] | None = None) -> LayoutReport:
    headers = ["stdio.h", "stddef.h", *module.LAYOUT_HEADERS]
    include_dirs = [*(include_dirs or []), *getattr(module, "LAYOUT_INCLUDE_DIRS", [])]
    added_in = getattr(module, "ADDED_IN", {})
    structs = list(getattr(module, "LAYOUT_STRUCTS", []) if structs is None else structs)
    report = LayoutReport()
    expected: dict[str, int] = {}
    added_key: dict[str, str] = {}  # probe key -> the ADDED_IN key it proves
    lines: list[str] = []

    def lacks(name: str, probe: str) -> bool:
        """An ADDED_IN item these headers do not have (recorded as unavailable)."""
        if name not in added_in or _compiles(headers, include_dirs, probe):
            return False
        report.unavailable.append(f"{name} (added in Linux {added_in[name]})")
        report.missing.add(name)
        return True

    for cls in structs:
        cname = c_name(cls)
        if lacks(cls.__name__, f"(void)sizeof({cname})"):
            continue
        key = f"sizeof {cname}"
        expected[key] = ctypes.sizeof(cls)
        if cls.__name__ in added_in:
            added_key[key] = cls.__name__
        lines.append(f'printf("%s=%llu\\n", "{key}", (unsigned long long)sizeof({cname}));')
        for path, offset, size in field_paths(cls):
            if lacks(f"{cname}.{path}", f"(void)offsetof({cname}, {path})"):
                continue
            if f"{cname}.{path}" in added_in:
                added_key[f"offsetof {cname}.{path}"] = f"{cname}.{path}"
            key = f"offsetof {cname}.{path}"
            expected[key] = offset
            lines.append(f'printf("%s=%llu\\n", "{key}", (unsigned long long)offsetof({cname}, {path}));')
            key = f"sizeof {cname}.{path}"
            expected[key] = size
            lines.append(f'printf("%s=%llu\\n", "{key}", (unsigned long long)sizeof((({cname} *)0)->{path}));')
    for name in getattr(module, "LAYOUT_ENUM_CONSTANTS", []):  # enumerators: #ifdef cannot see them
        if lacks(name, f"(void)({name})"):
            continue
        expected[name] = int(getattr(module, name)) & 0xFFFF_FFFF_FFFF_FFFF
        added_key[name] = name
        lines.append(f'printf("%s=%llu\\n", "{name}", (unsigned long long)({name}));')
    for name in getattr(module, "LAYOUT_CONSTANTS", []):
        value = getattr(module, name)
        expected[name] = int(value) & 0xFFFF_FFFF_FFFF_FFFF
        added_key[name] = name
        lines.append(f'#ifdef {name}\nprintf("%s=%llu\\n", "{name}", (unsigned long long)({name}));\n'
                     f'#else\nprintf("%s=undefined\\n", "{name}");\n#endif')
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "layout.c"
        src.write_text("".join(f"#include <{h}>\n" for h in headers) + "int main(void) {\n" + "\n".join(lines)
                       + "\nreturn 0;\n}\n")
        exe = Path(tmp) / "layout"
        build = subprocess.run(["gcc", "-o", str(exe), *[f"-I{d}" for d in include_dirs], str(src)],
                               capture_output=True, text=True)
        if build.returncode:
            raise AssertionError(f"layout probe for {module.__name__} does not compile:\n{build.stderr[-4000:]}")
        output = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    actual = dict(line.split("=", 1) for line in output.splitlines())
    for key, value in expected.items():
        got = actual.get(key)
        if got == "undefined":
            if key in added_in:
                report.unavailable.append(f"{key} (added in Linux {added_in[key]})")
                report.missing.add(key)
            else:
                report.mismatches.append(f"{key}: not defined by the installed headers")
            continue
        report.compared += 1
        if got is None or int(got) != value:
            report.mismatches.append(f"{key}: python {value} != C {got}")
        elif added_key.get(key) in added_in:
            report.proven.add(added_key[key])
    return report


def linux_version(include_dirs: list[str]) -> tuple[int, int]:
    """(major, minor) of the header set: LINUX_VERSION_CODE of its <linux/version.h>."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "version.c"
        src.write_text("#include <stdio.h>\n#include <linux/version.h>\n"
                       "int main(void) { printf(\"%d\\n\", LINUX_VERSION_CODE); return 0; }\n")
        exe = Path(tmp) / "version"
        subprocess.run(["gcc", "-o", str(exe), *[f"-I{d}" for d in include_dirs], str(src)], check=True,
                       capture_output=True)
        code = int(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    return code >> 16, (code >> 8) & 0xFF


def release(text: str) -> tuple[int, int]:
    """'6.10' -> (6, 10)."""
    major, minor = text.split(".")[:2]
    return int(major), int(minor)
