"""The wheel folder that lets raysdpb's Ray sweeps run on the lent GPU machine (scripts/gpu_ray_check.sh prepare).

That machine has no network; its image (/work/.library/device/KINDS.md) holds torch, transformers, peft, pyarrow,
pandas, PyYAML, scikit-learn, tensorboard and much more, but not Ray, pydantic or datasets. What it lacks travels as
wheels beside the git working tree, 64 MiB in all with the tree itself, so:

1. pip resolves the roots below for the machine's Python (`pip install --dry-run --report`, for another Python
   version and manylinux x86-64, binary wheels only);
2. the closure is taken from the roots through packages the image lacks only: an image package's own needs are the
   image's (`select`), and `SKIP` drops what the roots declare but a sweep never imports;
3. pip downloads exactly those (`--no-deps`), and Ray's wheel is stripped of what ray.train, ray.tune and Ray
   core never load (`strip_wheel`: the Java jar, RLlib, Serve, Ray LLM, the dashboard web client's source
   maps, tests and examples), re-zipped as a valid wheel (its RECORD lists what is left, entry points of removed
   parts dropped);
4. Ray's stripped wheel then travels as an xz tarball of its files (`wheel_to_tarball`: 25 MiB where the zip is 40:
   its three binaries compress far better with xz), unpacked into the install folder beside pip's install of the
   other wheels (gpu_ray_check.sh; a wheel's files are what pip installs, and Ray's console scripts are not used);
5. it prints each file's size and the total, and fails if the total passes the budget.

    python scripts/gpu_ray_wheels.py --dest .gpu_ray/wheels [--python-version 3.12] [--budget-mib 40]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# What a sweep imports that the image may lack. Ray core, with the dashboard's API server (Ray Train's
# placement-group cleaner reads the state API through it; ray/dashboard/optional_deps.py lists what it needs),
# Tune's TensorBoard logger (tensorboardX), pydantic (raysdpb's config and Ray Train), and datasets (raysdpb reads
# the hub through it; with a local mirror it is only imported). Pinned to the versions the CPU suite runs.
ROOTS = [
    "ray==2.60.0", "datasets==5.2.0", "pydantic==2.13.4", "tensorboardX==2.6.5", "jsonschema==4.26.0",
    "aiohttp-cors==0.8.1", "opencensus==0.11.4", "opentelemetry-sdk==1.45.2",
    "opentelemetry-exporter-prometheus==0.66b2", "opentelemetry-proto==1.45.2",
]
# Declared by a root's dependencies but never imported by a sweep: google-auth's cryptography (4 MB; the dashboard
# uses opencensus' stats, not Google Cloud's authentication).
SKIP = {"cryptography", "cffi", "pycparser"}

# The Python packages of the lent machine's image ('cuda'), as KINDS.md lists them (read there on 2026-11-17).
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

# What goes out of Ray's wheel: nothing ray.train, ray.tune or Ray core loads (checked by the rehearsal, which
# found that the dashboard's server needs its web client's build/ and build/static/ folders).
RAY_DROP = [
    re.compile(r"^ray/jars/"),                        # the Java worker (ray_dist.jar, 31 MB zipped)
    re.compile(r"^ray/(rllib|serve|llm)/"),           # RLlib, Serve, Ray LLM
    # the web pages' source maps (the dashboard's server refuses to start without its build/static folder)
    re.compile(r"^ray/dashboard/client/build/.*\.map$"),
    re.compile(r"^ray/(.+/)?tests/"),                 # test suites
    re.compile(r"^ray/(.+/)?examples/"),              # examples
]
# console scripts of what was removed (entry_points.txt)
RAY_DROP_SCRIPTS = {"serve", "rllib"}

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- stripping a wheel ---------------------------------------------------------------------------------------------

@dataclass
class StripResult:
    wheel: Path
    removed_files: int = 0
    removed_bytes: int = 0          # uncompressed
    kept_files: int = 0
    removed_scripts: list[str] = field(default_factory=list)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _dist_info(names: list[str]) -> str:
    infos = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info") and "/" in n}
    if len(infos) != 1:
        raise ValueError(f"a wheel has one .dist-info folder; found {sorted(infos) or 'none'}")
    return infos.pop()


def _without_scripts(text: str, scripts: set[str]) -> tuple[str, list[str]]:
    """entry_points.txt without the console scripts named."""
    out, removed, section = [], [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[console_scripts]" and "=" in stripped and stripped.split("=", 1)[0].strip() in scripts:
            removed.append(stripped.split("=", 1)[0].strip())
            continue
        out.append(line)
    return "\n".join(out) + "\n", removed


def strip_wheel(src: Path, dest_dir: Path, drop: list[re.Pattern], drop_scripts: set[str] = frozenset()) -> StripResult:
    """A copy of wheel `src` in `dest_dir` (same file name) without the files whose path matches a `drop` pattern
    and without the console scripts `drop_scripts`; its RECORD lists exactly the files left, with their hashes
    and sizes (pip checks them), so it installs as any wheel does. The .dist-info folder is never dropped."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    if dest.resolve() == src.resolve():
        raise ValueError(f"{src}: the stripped copy would overwrite it; give another folder")
    result = StripResult(wheel=dest)
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        dist_info = _dist_info([i.filename for i in infos])
        record_name = f"{dist_info}/RECORD"
        if record_name not in zin.namelist():
            raise ValueError(f"{src}: no {record_name}")
        rows: list[list[str]] = []
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in infos:
                name = info.filename
                if name == record_name:
                    continue
                if not name.startswith(dist_info + "/") and any(p.search(name) for p in drop):
                    result.removed_files += 1
                    result.removed_bytes += info.file_size
                    continue
                data = zin.read(info)
                if name == f"{dist_info}/entry_points.txt" and drop_scripts:
                    text, result.removed_scripts = _without_scripts(data.decode(), set(drop_scripts))
                    data = text.encode()
                if not name.endswith("/"):
                    rows.append([name, _record_hash(data), str(len(data))])
                    result.kept_files += 1
                copy = zipfile.ZipInfo(name, date_time=info.date_time)
                copy.external_attr = info.external_attr  # keeps the executables' mode (raylet, gcs_server)
                copy.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(copy, data, compresslevel=9)
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerows(rows + [[record_name, "", ""]])
            record = zipfile.ZipInfo(record_name, date_time=(2026, 1, 1, 0, 0, 0))
            record.external_attr = 0o644 << 16
            zout.writestr(record, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    return result


def check_record(wheel: Path) -> None:
    """Raise ValueError unless the wheel's RECORD lists every file with its right hash and size (as pip checks)."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        dist_info = _dist_info(names)
        record_name = f"{dist_info}/RECORD"
        rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(z.read(record_name).decode())) if row}
        if set(rows) != set(names):
            only_record, only_wheel = sorted(set(rows) - set(names))[:5], sorted(set(names) - set(rows))[:5]
            raise ValueError(f"{wheel.name}: RECORD and files differ: only in RECORD {only_record}, only in the "
                             f"wheel {only_wheel}")
        for name in names:
            if name == record_name:
                continue
            data = z.read(name)
            if rows[name] != [_record_hash(data), str(len(data))]:
                raise ValueError(f"{wheel.name}: RECORD's hash or size of {name} is wrong")


# --- resolving and choosing ----------------------------------------------------------------------------------------

def _marker_env(python_version: str) -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "platform_python_implementation": "CPython", "implementation_name": "cpython", "extra": ""}


def select(report: dict, roots: list[str], image: frozenset[str], skip: set[str], python_version: str) -> list[dict]:
    """The packages of a pip `--report` to bring: the roots' closure through packages the image lacks (an image
    package's own needs are the image's business), less `skip`. Each as {name, version, requires}."""
    from packaging.requirements import Requirement

    env = _marker_env(python_version)
    nodes = {normalize(item["metadata"]["name"]): item for item in report["install"]}
    chosen: dict[str, dict] = {}
    todo = [normalize(Requirement(r).name) for r in roots]
    while todo:
        name = todo.pop()
        if name in chosen or name in image or name in skip:
            continue
        if name not in nodes:
            raise ValueError(f"{name}: in the closure but not in pip's resolution")
        meta = nodes[name]["metadata"]
        needs = []
        for spec in meta.get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):  # extra == "" : no extras asked for
                needs.append(normalize(req.name))
        chosen[name] = {"name": meta["name"], "version": meta["version"], "requires": sorted(set(needs))}
        todo.extend(needs)
    return sorted(chosen.values(), key=lambda p: normalize(p["name"]))


def _pip_target_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def _pip(*args: str) -> None:
    """pip, its output shown only when it fails (it warns about every local index folder a package lacks)."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"gpu_ray_wheels: pip {args[0]} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def resolve(roots: list[str], python_version: str, work: Path) -> dict:
    report = work / "report.json"
    _pip("install", "--dry-run", "--ignore-installed", "--target", str(work / "target"), "--report", str(report),
         *_pip_target_args(python_version), *roots)
    return json.loads(report.read_text())


def download(packages: list[dict], python_version: str, dest: Path) -> None:
    _pip("download", "--no-deps", "-d", str(dest), *_pip_target_args(python_version),
         *(f"{p['name']}=={p['version']}" for p in packages))


def build(dest: Path, python_version: str, budget_mib: float, downloads: Path | None = None) -> dict:
    """Resolve, choose, download and strip into `dest` (emptied first); returns the manifest (also written as
    `dest/../manifest.json`)."""
    with tempfile.TemporaryDirectory(prefix="gpu-ray-wheels-") as tmp:
        work = Path(tmp)
        report = resolve(ROOTS, python_version, work)
        packages = select(report, ROOTS, IMAGE_PACKAGES, SKIP, python_version)
        raw = downloads or work / "downloads"
        raw.mkdir(parents=True, exist_ok=True)
        download(packages, python_version, raw)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        stripped = None
        for wheel in sorted(raw.glob("*.whl")):
            if normalize(wheel.name.split("-")[0]) not in {normalize(p["name"]) for p in packages}:
                continue  # a wheel of another run left in --downloads
            if normalize(wheel.name.split("-")[0]) == "ray":
                result = strip_wheel(wheel, dest, RAY_DROP, RAY_DROP_SCRIPTS)
                check_record(result.wheel)
                stripped = {"wheel": wheel.name, "size_before": wheel.stat().st_size,
                            "size_after": result.wheel.stat().st_size, "removed_files": result.removed_files,
                            "removed_bytes_unzipped": result.removed_bytes, "removed_scripts": result.removed_scripts,
                            "removed_patterns": [p.pattern for p in RAY_DROP]}
                stripped["tarball_bytes"] = wheel_to_tarball(result.wheel).stat().st_size
            else:
                shutil.copy2(wheel, dest / wheel.name)
    wheels = sorted([*dest.glob("*.whl"), *dest.glob("*.tar.xz")], key=lambda w: -w.stat().st_size)
    found = {normalize(w.name.split("-")[0]) for w in wheels}
    missing = [p["name"] for p in packages if normalize(p["name"]) not in found]
    if missing:
        raise SystemExit(f"gpu_ray_wheels: pip downloaded no wheel of {', '.join(missing)}")
    total = sum(w.stat().st_size for w in wheels)
    manifest = {"python_version": python_version, "roots": ROOTS, "skipped": sorted(SKIP), "ray_strip": stripped,
                "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in wheels], "total_bytes": total,
                "packages": packages}
    (dest.parent / f"manifest-cp{python_version.replace('.', '')}.json").write_text(json.dumps(manifest, indent=1))
    print(f"{'MiB':>7}  wheel")
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f}  {w.name}")
    if stripped:
        print(f"(ray: {stripped['size_before'] / 2**20:.1f} MiB as downloaded, {stripped['removed_files']} files "
              f"removed)")
    print(f"{total / 2**20:7.2f}  total, {len(wheels)} wheels in {dest} (budget {budget_mib:g} MiB)")
    if total > budget_mib * 2**20:
        raise SystemExit(f"gpu_ray_wheels: {total / 2**20:.1f} MiB of wheels is over the budget of {budget_mib:g} MiB")
    return manifest


def wheel_to_tarball(wheel: Path) -> Path:
    """`wheel` as `<its name less .whl>.tar.xz` beside it (the wheel removed): its files, each with the mode the
    wheel records (the binaries executable), in the wheel's order, for `tar -xJf TARBALL -C SITE` to lay out as
    `pip install --target SITE` would (a wheel without a `.data` folder, whose console scripts are not needed)."""
    import tarfile

    target = wheel.with_name(wheel.name[:-len(".whl")] + ".tar.xz")
    with zipfile.ZipFile(wheel) as z:
        if any(n.split("/", 1)[0].endswith(".data") for n in z.namelist()):
            raise ValueError(f"{wheel.name} has a .data folder: pip must install it")
        with tarfile.open(target, "w:xz", preset=6) as tar:
            for info in z.infolist():
                if info.is_dir():
                    continue
                data = z.read(info)
                member = tarfile.TarInfo(info.filename)
                member.size, member.mtime = len(data), 0
                member.mode = (info.external_attr >> 16) & 0o777 or 0o644
                tar.addfile(member, io.BytesIO(data))
    wheel.unlink()
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, required=True, help="the wheel folder to (re)make")
    parser.add_argument("--python-version", default="3.12", help="the target machine's Python (default 3.12)")
    parser.add_argument("--budget-mib", type=float, default=40.0, help="fail if the wheels add up to more")
    parser.add_argument("--downloads", type=Path, help="keep pip's downloads here (reused by a second run)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.12")
    build(args.dest, args.python_version, args.budget_mib, args.downloads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
