"""Make an ONNXRUNTIME_ROOT (include/, lib/) from ONNX Runtime's C/C++ headers and the library inside the
``onnxruntime`` Python wheel, so the C++ example builds where only the wheel is installed.

The wheel ships ``onnxruntime/capi/libonnxruntime.so.<version>`` but no headers, no ``libonnxruntime.so``
for the linker and no ``libonnxruntime.so.1`` (the library's SONAME, which the executable asks the loader
for): this script adds the two links. Headers may be older than the library (the C API keeps every older
version), never newer; that is checked.

    python examples/cpp/assemble_ort_root.py --headers /usr/include/onnxruntime -o build/ort
    cmake -S examples/cpp -B build/cpp -DONNXRUNTIME_ROOT=build/ort && cmake --build build/cpp
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path


def wheel_library() -> Path:
    """The shared library inside the installed onnxruntime (or onnxruntime-gpu) wheel."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the onnxruntime Python package is not installed — pip install 'espace-export[cpu]'")
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    libraries = sorted(capi.glob("libonnxruntime.so.*")) + sorted(capi.glob("libonnxruntime.*.dylib"))
    if not libraries:
        raise SystemExit(f"error: no libonnxruntime shared library in {capi} — reinstall onnxruntime")
    return libraries[-1]


def header_api_version(headers: Path) -> int:
    text = (headers / "onnxruntime_c_api.h").read_text(encoding="utf-8", errors="replace")
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not match:
        raise SystemExit(f"error: no ORT_API_VERSION in {headers / 'onnxruntime_c_api.h'}")
    return int(match.group(1))


def library_api_version(library: Path) -> int:
    """ONNX Runtime 1.X serves C API versions up to X: read X from the file name (libonnxruntime.so.1.32.0)."""
    match = re.search(r"\.so\.1\.(\d+)|\.1\.(\d+)\.\d+\.dylib", library.name)
    if not match:
        raise SystemExit(f"error: cannot read the version of {library.name}")
    return int(match.group(1) or match.group(2))


def find_headers(start: Path) -> Path:
    for candidate in (start, start / "include", start / "include" / "onnxruntime", start / "usr/include/onnxruntime"):
        if (candidate / "onnxruntime_cxx_api.h").is_file():
            return candidate
    raise SystemExit(f"error: no onnxruntime_cxx_api.h in {start} (nor its include/, include/onnxruntime/)")


def assemble(headers: Path, root: Path, library: Path | None = None) -> Path:
    """``root/include`` → the headers, ``root/lib/libonnxruntime.so{,.1}`` → the library; returns ``root``."""
    headers = find_headers(headers.resolve())
    library = (library or wheel_library()).resolve()
    if header_api_version(headers) > library_api_version(library):
        raise SystemExit(
            f"error: the headers (C API {header_api_version(headers)}) are newer than {library.name} "
            f"(C API {library_api_version(library)}): use headers of ONNX Runtime 1.{library_api_version(library)} "
            "or older"
        )
    (root / "lib").mkdir(parents=True, exist_ok=True)
    links = {root / "include": headers, root / "lib" / "libonnxruntime.so": library,
             root / "lib" / "libonnxruntime.so.1": library}  # fmt: skip
    for link, target in links.items():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=target.is_dir())
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headers", type=Path, required=True, help="folder holding onnxruntime_cxx_api.h")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the ONNXRUNTIME_ROOT to make")
    parser.add_argument("--library", type=Path, help="libonnxruntime.so.1.X to use (default: the wheel's)")
    args = parser.parse_args(argv)
    root = assemble(args.headers, args.output, args.library)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
