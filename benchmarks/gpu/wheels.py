"""The Python packages a GPU machine needs beyond its image, carried as wheels: which ones, whether a wheel
folder holds them for the target interpreter, and installing only those the running interpreter lacks.

    .venv/bin/python benchmarks/gpu/wheels.py list [--built-here | --binary]   # name==version, this .venv's
    .venv/bin/python benchmarks/gpu/wheels.py check --wheels .cache/gpu-wheels --python-version 3.12
    python3 benchmarks/gpu/wheels.py install --wheels .cache/gpu-wheels --target /tmp/hyperclone-gpu-site

The versions are the ones this checkout's .venv holds (configs/constraints.txt's pins and what CI resolved
beside them), so the GPU runs the set the CPU tests ran. Nothing here needs more than the standard library
and ``packaging``, which pip and every such image carry.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from gpu_common import REPO, OneLineParser
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

# pyproject's dependencies that a training run imports; gguf and accelerate serve the real-model tests,
# wandb only --wandb-project, pytest and ruff CI: none of them is needed on the GPU machine
RUNTIME = ("torch", "deepspeed", "megatron-core", "transformers", "sentencepiece", "protobuf", "safetensors",
           "tensorboard", "tqdm", "matplotlib")
# carried: the two the GPU image lacks and the closure of their requirements; installed only where missing
CARRIED = ("megatron-core", "deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "typing-extensions", "einops", "msgpack", "ninja", "psutil", "py-cpuinfo",
           "tqdm", "packaging")
# never carried: the image's own CUDA build of torch and its numpy (a torch wheel alone is 0.5-0.9 GB)
IMAGE_ONLY = ("torch", "numpy")
# PyPI has only a source archive of DeepSpeed: prepare_wheels.sh builds a pure-Python wheel of it here
# (DS_BUILD_OPS=0: no compiled ops; this project's torch AdamW needs none)
BUILT_HERE = ("deepspeed",)
CARRY_LIMIT_MIB = 64  # what travels to the device machine: the working tree and the carried folders


class WheelError(Exception):
    pass


def target_platforms() -> list[str]:
    # glibc 2.17 (manylinux2014) up to 2.39 (Ubuntu 24.04, whose Python is the device image's 3.12)
    return [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                      "manylinux1_x86_64", "linux_x86_64"]


def target_tags(python_version: str) -> set:
    major, minor = (int(p) for p in python_version.split(".")[:2])
    platforms = target_platforms()
    tags = set(cpython_tags((major, minor), abis=[f"cp{major}{minor}"], platforms=platforms))
    return tags | set(compatible_tags((major, minor), interpreter=f"cp{major}{minor}", platforms=platforms))


def target_markers(python_version: str) -> dict[str, str]:
    """Marker values of the target interpreter, so a wheel's requirements are read as it would read them."""
    short = ".".join(python_version.split(".")[:2])
    full = python_version if python_version.count(".") == 2 else f"{short}.0"
    return {"python_version": short, "python_full_version": full, "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def scan(folder: Path) -> dict[str, tuple[Path, Version, frozenset]]:
    """{canonical name: (wheel, version, tags)} of a wheel folder; two versions of one package are an error
    (pip would stop the whole install)."""
    found: dict[str, tuple[Path, Version, frozenset]] = {}
    for path in sorted(folder.glob("*.whl")):
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except ValueError as exc:
            raise WheelError(f"{path}: not a wheel file name ({exc})") from None
        if name in found:
            raise WheelError(f"{folder} holds two wheels of {name}: {found[name][0].name} and {path.name}")
        found[str(name)] = (path, version, tags)
    return found


def requirements(wheel: Path, markers: dict[str, str]) -> list[Requirement]:
    """The wheel's own requirements that apply to the target (extras left out)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise WheelError(f"{wheel} has no METADATA")
        message = Parser().parsestr(zf.read(meta).decode())
    reqs = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(markers)]


def roots() -> list[Requirement]:
    """RUNTIME with pyproject's version specifiers."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {canonicalize_name(Requirement(d).name): Requirement(d) for d in deps}
    return [reqs[canonicalize_name(name)] for name in RUNTIME]


def plan(wheels: dict, installed, wanted: list[Requirement], markers: dict[str, str]) -> list[str]:
    """Names to install from ``wheels`` so that every wanted requirement and every requirement of what is
    installed from the folder holds; ``installed(name)`` is the interpreter's version, None where it has
    none, or True for "there, in a version that fits" (the image's torch when simulating an image)."""
    chosen: dict[str, Version] = {}
    queue = list(wanted)
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        have = chosen.get(name) or installed(name)
        if have is True or (have is not None and req.specifier.contains(have, prereleases=True)):
            continue
        if name in chosen:
            raise WheelError(f"{req} is needed but the wheel folder's {name} is {have}")
        if name not in wheels:
            what = f"{name} {have}" if have else f"no {name}"
            raise WheelError(f"{req} is needed but the interpreter has {what} and the wheel folder has none")
        path, version, _ = wheels[name]
        if not req.specifier.contains(version, prereleases=True):
            raise WheelError(f"{req} is needed but the wheel folder has {path.name}")
        chosen[name] = version
        queue.extend(requirements(path, markers))
    return list(chosen)


def installed_version(name: str) -> Version | bool | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None
    except InvalidVersion:  # a local build with a free-form version: there, and left as it is
        return True


def check(folder: Path, python_version: str) -> list[str]:
    """Lines describing the folder against the target; raises WheelError on the first problem."""
    if not folder.is_dir():
        raise WheelError(f"no wheel folder {folder} (bash benchmarks/gpu/prepare_wheels.sh makes it)")
    wheels = scan(folder)
    missing = [n for n in CARRIED if canonicalize_name(n) not in wheels]
    if missing:
        raise WheelError(f"{folder} lacks wheels of {', '.join(missing)} (bash benchmarks/gpu/prepare_wheels.sh)")
    tags, markers = target_tags(python_version), target_markers(python_version)
    lines, total = [], 0
    for name, (path, version, wheel_tags) in sorted(wheels.items()):
        if not wheel_tags & tags:
            raise WheelError(f"{path.name} does not install on CPython {python_version} manylinux x86_64")
        size = path.stat().st_size
        total += size
        lines.append(f"  {name:<18} {str(version):<10} {size / 2**20:6.2f} MiB  {path.name}")
    image = {canonicalize_name(n) for n in IMAGE_ONLY}
    bare = lambda name: True if name in image else None  # an image holding torch and numpy alone
    carried_roots = [r for r in roots() if canonicalize_name(r.name) in ("deepspeed", "megatron-core")]
    would = plan(wheels, bare, carried_roots, markers)
    head = (f"wheels: {folder} holds {len(wheels)} wheels, {total / 2**20:.1f} MiB, every one installable on "
            f"CPython {python_version} manylinux x86_64")
    return [head, *lines, f"wheels: on an image holding only {' and '.join(IMAGE_ONLY)} the check installs "
            f"{len(would)} of them; their requirements are all in the folder"]


def listing(which: str) -> list[str]:
    names = {"all": CARRIED, "built-here": BUILT_HERE,
             "binary": tuple(n for n in CARRIED if n not in BUILT_HERE)}[which]
    out = []
    for name in names:
        version = installed_version(name)
        if version is None:
            raise WheelError(f"this interpreter has no {name}: run bash launch/bootstrap.sh first")
        out.append(f"{name}=={version}")
    return out


def install(folder: Path, target: Path) -> list[str]:
    """Install into ``target`` what this interpreter lacks; the names and versions installed."""
    wheels = scan(folder) if folder.is_dir() else {}
    markers = target_markers(".".join(map(str, sys.version_info[:3])))
    names = plan(wheels, installed_version, roots(), markers)
    if names:
        files = [str(wheels[n][0]) for n in names]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), *files], check=True)
    return [f"{n}=={wheels[n][1]}" for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="wheels.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="name==version of each carried package, as this interpreter has it")
    ls.add_argument("--built-here", action="store_const", const="built-here", dest="which", default="all")
    ls.add_argument("--binary", action="store_const", const="binary", dest="which")
    ck = sub.add_parser("check", help="does a wheel folder hold every carried package for the target?")
    ck.add_argument("--wheels", type=Path, required=True)
    ck.add_argument("--python-version", default="3.12", help="the target interpreter (the device image's: 3.12)")
    ins = sub.add_parser("install", help="install what this interpreter lacks into --target")
    ins.add_argument("--wheels", type=Path, required=True)
    ins.add_argument("--target", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(listing(args.which)))
        elif args.command == "check":
            print("\n".join(check(args.wheels, args.python_version)))
        else:
            done = install(args.wheels, args.target)
            print(f"wheels: installed {', '.join(done)} into {args.target}" if done
                  else "wheels: the interpreter has every package the check needs; nothing installed")
    except (WheelError, OSError, zipfile.BadZipFile) as exc:
        print(f"wheels.py: error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"wheels.py: error: pip install failed (exit {exc.returncode})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
