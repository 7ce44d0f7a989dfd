"""Compare ctypes mirrors with the C headers they mirror, by compiling a probe with gcc.

A module under check declares LAYOUT_HEADERS (headers to #include),
LAYOUT_STRUCTS (ctypes classes named as the C struct, or with a `_c_name_`),
LAYOUT_CONSTANTS (names of module attributes equal to C macros/enums) and
LAYOUT_ENUM_CONSTANTS (enumerators), optionally ADDED_IN {name: linux release} for items newer than the installed
headers may be, and LAYOUT_INCLUDE_DIRS.
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


def check_module(module, structs=None) -> LayoutReport:
    headers = ["stdio.h", "stddef.h", *module.LAYOUT_HEADERS]
    include_dirs = list(getattr(module, "LAYOUT_INCLUDE_DIRS", []))
    added_in = getattr(module, "ADDED_IN", {})
    structs = list(getattr(module, "LAYOUT_STRUCTS", []) if structs is None else structs)
    report = LayoutReport()
    expected: dict[str, int] = {}
    lines: list[str] = []
    for cls in structs:
        cname = c_name(cls)
        if cls.__name__ in added_in and not _compiles(headers, include_dirs, f"(void)sizeof({cname})"):
            report.unavailable.append(f"{cname} (added in Linux {added_in[cls.__name__]})")
            continue
        key = f"sizeof {cname}"
        expected[key] = ctypes.sizeof(cls)
        lines.append(f'printf("%s=%llu\\n", "{key}", (unsigned long long)sizeof({cname}));')
        for path, offset, size in field_paths(cls):
            key = f"offsetof {cname}.{path}"
            expected[key] = offset
            lines.append(f'printf("%s=%llu\\n", "{key}", (unsigned long long)offsetof({cname}, {path}));')
            key = f"sizeof {cname}.{path}"
            expected[key] = size
            lines.append(f'printf("%s=%llu\\n", "{key}", (unsigned long long)sizeof((({cname} *)0)->{path}));')
    for name in getattr(module, "LAYOUT_ENUM_CONSTANTS", []):  # enumerators: #ifdef cannot see them
        if name in added_in and not _compiles(headers, include_dirs, f"(void)({name})"):
            report.unavailable.append(f"{name} (added in Linux {added_in[name]})")
            continue
        expected[name] = int(getattr(module, name)) & 0xFFFF_FFFF_FFFF_FFFF
        lines.append(f'printf("%s=%llu\\n", "{name}", (unsigned long long)({name}));')
    for name in getattr(module, "LAYOUT_CONSTANTS", []):
        value = getattr(module, name)
        expected[name] = int(value) & 0xFFFF_FFFF_FFFF_FFFF
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
            else:
                report.mismatches.append(f"{key}: not defined by the installed headers")
            continue
        report.compared += 1
        if got is None or int(got) != value:
            report.mismatches.append(f"{key}: python {value} != C {got}")
    return report
