"""Finding the captures a job reads: files, folders and globs, local or remote (gs://, s3://, ...).

A folder is searched recursively for capture names: `.pcap`, `.pcapng`, `.cap`, `.dmp`, optionally
followed by tcpdump's rotation number and/or `.gz`. Other files in a folder (READMEs, notes) are not
read. Files named explicitly on the command line and glob matches are always read. A file that then
turns out not to be a capture is listed as a dead letter in the manifest.

Each file gets a name relative to the input it was found under. Names identify captures in session
ids, example origins and the manifest, so moving a dataset does not change the shards.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re

from apache_beam.io.filesystems import FileSystems

CAPTURE_NAME = re.compile(r"\.(pcap|pcapng|cap|dmp)\d*(\.gz)?$", re.IGNORECASE)


def _is_remote(path: str) -> bool:
    return "://" in path


def _match_remote(pattern: str) -> list[str]:
    return sorted(item.path for item in FileSystems.match([pattern])[0].metadata_list)


def list_folder(folder: str) -> list[str]:
    """Return the capture files under `folder` (recursively), sorted, skipping hidden files and folders."""
    if _is_remote(folder):
        found = _match_remote(folder.rstrip("/") + "/**")
        return [path for path in found if CAPTURE_NAME.search(path)]
    found = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and CAPTURE_NAME.search(name):
                found.append(os.path.join(directory, name))
    return sorted(found)


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """Return (path, name) for every capture that `inputs` (files, folders or globs) name.

    Raises FileNotFoundError naming an input that matches nothing.
    """
    found: list[tuple[str, str]] = []
    for item in inputs:
        if _is_remote(item):
            is_pattern = any(ch in item for ch in "*?[")
            if is_pattern:
                paths = _match_remote(item)
                base = item.split("*")[0].rsplit("/", 1)[0]
            elif FileSystems.exists(item) and _match_remote(item):
                paths, base = [item], posixpath.dirname(item)
            else:
                paths, base = list_folder(item), item.rstrip("/")
        elif os.path.isdir(item):
            paths, base = list_folder(item), item
        elif os.path.isfile(item):
            paths, base = [item], os.path.dirname(item)
        else:
            paths = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            base = os.path.dirname(item.split("*")[0].split("?")[0].split("[")[0])
        if not paths:
            raise FileNotFoundError(f"input {item!r} matches no capture file; pass capture files, folders "
                                    "holding .pcap/.pcapng/.cap files, or a glob such as 'dir/**/*.pcap'")
        for path in paths:
            found.append((path, _relative_name(path, base)))

    # Names must be unique across inputs; fall back to the full path where two inputs collide.
    counts: dict[str, int] = {}
    for _, name in found:
        counts[name] = counts.get(name, 0) + 1
    unique = {}
    for path, name in found:
        unique[path] = name if counts[name] == 1 else path
    return sorted(unique.items(), key=lambda item: item[1])


def _relative_name(path: str, base: str) -> str:
    if _is_remote(path):
        prefix = base.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
    relative = os.path.relpath(path, base or ".")
    return relative.replace(os.sep, "/")


def list_labeled_tree(root: str) -> dict[str, list[tuple[str, str]]]:
    """Return class name -> [(path, name)] for `root/<class>/**` captures; names are relative to root.

    Classes are the folders directly under `root` that hold at least one capture. Files directly in
    `root` belong to no class and are ignored.
    """
    if _is_remote(root):
        classes = sorted({path[len(root.rstrip("/")) + 1:].split("/", 1)[0]
                          for path in _match_remote(root.rstrip("/") + "/**") if CAPTURE_NAME.search(path)
                          and "/" in path[len(root.rstrip("/")) + 1:]})
        folders = {name: root.rstrip("/") + "/" + name for name in classes}
    else:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"fine-tuning root {root!r} is not a folder; pass a folder with one "
                                    "subfolder of captures per class")
        folders = {name: os.path.join(root, name) for name in sorted(os.listdir(root))
                   if not name.startswith(".") and os.path.isdir(os.path.join(root, name))}

    tree = {}
    for name, folder in folders.items():
        files = [(path, _relative_name(path, root)) for path in list_folder(folder)]
        if files:
            tree[name] = files
    if not tree:
        raise FileNotFoundError(f"no class folder with captures under {root!r}; expected root/<class>/*.pcap")
    return tree
