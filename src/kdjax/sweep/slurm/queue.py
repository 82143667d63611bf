"""SLURM's commands (squeue, sacct, scancel) and the check that a sweep's workdir lies on a filesystem the nodes
share."""
import os
import shutil
import socket
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple


from kdjax.errors import KdjaxError

# squeue's %T in SLURM 22.05: a job in one of these may still run (or run again); any other state is final.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                           "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})

class SlurmError(KdjaxError, ValueError):
    """SLURM cannot be reached or refused something; one line that says what."""


# --------------------------------------------------------------------------------------------------------------
# SLURM's commands


def _slurm(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"`{argv[0]}` is not on PATH: executor=slurm runs where SLURM's commands (sbatch, squeue, "
                         f"scancel) are, e.g. a login node") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{argv[0]}` did not answer within {timeout:.0f} s: is slurmctld up?") from None


def job_states(job_ids: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """{job id: (state, reason)} of the jobs squeue still knows (array tasks as ``<array>_<task>``); a job it has
    forgotten (finished longer than MinJobAge ago) is absent."""
    ids = list(dict.fromkeys(str(j) for j in job_ids))
    out: Dict[str, Tuple[str, str]] = {}
    for start in range(0, len(ids), 200):
        chunk = ids[start:start + 200]
        proc = _slurm("squeue", "-h", "-t", "all", "-r", "-j", ",".join(chunk), "-o", "%i|%T|%r")
        if proc.returncode != 0:
            # one forgotten id alone is an error to squeue ("Invalid job id specified"); with others it is dropped
            if "Invalid job id" in proc.stderr + proc.stdout:
                continue
            raise SlurmError(f"squeue failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[:300]}")
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def sacct_states(job_ids: Sequence[str]) -> Dict[str, str]:
    """{job id: final state} from sacct where it works (clusters with accounting), else {}: only used to say how
    a job squeue has forgotten ended."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    proc = _slurm("sacct", "-n", "-P", "-X", "-j", ",".join(dict.fromkeys(job_ids)), "-o", "JobID,State")
    if proc.returncode != 0:
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 2 and parts[1]:
            out[parts[0]] = parts[1].split()[0]
    return out


def scancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        proc = _slurm("scancel", *job_ids)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise SlurmError(f"scancel failed ({proc.returncode}): {proc.stderr.strip()[:300]}")


# --------------------------------------------------------------------------------------------------------------
# Is the workdir on a filesystem the nodes share?

SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "fuse.beegfs", "cephfs", "ceph", "fuse.ceph",
                      "glusterfs", "fuse.glusterfs", "cifs", "smb3", "smbfs", "panfs", "wekafs", "afs", "ocfs2",
                      "gfs2", "fuse.sshfs", "fuse.juicefs", "fuse.s3fs", "pvfs2", "orangefs", "fhgfs", "quobyte",
                      "fuse.quobyte", "virtiofs", "9p"}
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "vfat", "exfat",
                     "ramfs", "devtmpfs", "squashfs", "jfs", "reiserfs", "ntfs", "ntfs3", "fuse.overlayfs"}


def filesystem_of(path: str) -> Optional[str]:
    """The type of the filesystem ``path`` is (or would be) on: the longest mount point above it in
    /proc/mounts; None where that cannot be read."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ").replace("\\011", "\t")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def partition_nodes(partition: Optional[str]) -> Optional[List[str]]:
    args = ["sinfo", "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else [])
    proc = _slurm(*args)
    if proc.returncode != 0:
        return None
    return sorted({line.strip() for line in proc.stdout.splitlines() if line.strip()})


def check_shared_filesystem(root: str, partition: Optional[str], log=print) -> str:
    """Refuse a workdir on a filesystem local to this host when the jobs run on other nodes (they would not see
    it); say so when it cannot tell. Returns the verdict line."""
    kind = filesystem_of(root)
    if kind in SHARED_FILESYSTEMS:
        verdict = f"[sweep] workdir {root} is on {kind}, a filesystem shared between nodes"
    elif kind in LOCAL_FILESYSTEMS:
        nodes = partition_nodes(partition)
        here = socket.gethostname().split(".")[0]
        if nodes is not None and set(n.split(".")[0] for n in nodes) <= {here}:
            verdict = (f"[sweep] workdir {root} is on {kind}, local to this host, which is the only node of the "
                       f"partition: the jobs see it")
        elif nodes is None:
            verdict = (f"[sweep] workdir {root} is on {kind}, local to this host, and sinfo does not list the "
                       f"partition's nodes: cannot tell whether the jobs see it")
        else:
            shown = ", ".join(nodes[:5]) + (", ..." if len(nodes) > 5 else "")
            raise SlurmError(f"workdir {root} is on {kind}, a filesystem local to this host ({here}), but the jobs run "
                             f"on {shown}: put --workdir on a filesystem the nodes share (NFS, Lustre, GPFS, ...), or "
                             f"set --config.slurm.check_shared_fs=false if this path is shared after all")
    else:
        verdict = (f"[sweep] cannot tell whether workdir {root} ({kind or 'unknown filesystem'}) is shared with "
                   f"the nodes: the jobs must see it under the same path")
    log(verdict)
    return verdict
